"""Typed errors raised by llm-flow.

Every error a user can cause derives from :class:`LlmFlowError`. The CLI turns them into one
stderr line and exit code 2; the app shows them with ``st.error``. Messages say what was wrong
and how to fix it.
"""


class LlmFlowError(Exception):
    """Base class of every error llm-flow raises on purpose."""


class ConfigError(LlmFlowError, ValueError):
    """A config file or config entry is invalid."""


class UnknownModelError(LlmFlowError, KeyError):
    """A model name is not in the config."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(LlmFlowError):
    """Weights or tokenizer could not be loaded (missing files, offline hub, bad format)."""


class OfflineError(ModelLoadError):
    """A hub model was asked for while the machine has no internet access."""


class DeviceError(LlmFlowError):
    """The requested device or dtype is not available (e.g. CUDA on a CPU-only machine)."""


class PromptError(LlmFlowError, ValueError):
    """The prompt is empty, too long, or otherwise unusable."""


class SelfCheckError(LlmFlowError):
    """A decomposition identity failed: the parts do not sum to the whole.

    Raised instead of returning a silently wrong graph. The message names the layer and block.
    """
