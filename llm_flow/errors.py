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


class UnsupportedModelError(ModelLoadError):
    """The model's design cannot be written as a sum of parts (state-space or linear-attention
    layers, an encoder-decoder, …); the message names the architecture and what is missing."""


class DeviceError(LlmFlowError):
    """The requested device or dtype is not available (e.g. CUDA on a CPU-only machine)."""


class KernelError(DeviceError):
    """A Triton kernel did not compile or does not fit this GPU (e.g. its shared memory)."""


class LaunchError(LlmFlowError):
    """The explorer cannot be started (Streamlit, or a file the package bundles, is missing)."""


class InputError(LlmFlowError, ValueError):
    """An argument is outside what the model, the prompt or the analysis allows."""


class PromptError(InputError):
    """The prompt (or a prompt file) is empty, too long, or otherwise unusable."""


class PositionError(InputError, IndexError):
    """A token position is outside the prompt."""


class ThresholdError(InputError):
    """A threshold is outside [0, 1]."""


class LensError(InputError):
    """A lens query names a node, layer, head, neuron or position the run does not have."""


class ContrastError(InputError):
    """A target/distractor token is not a single token, or the two are the same."""


class InterventionError(InputError):
    """An ablation names a layer, head, neuron, position or edge the model/prompt does not have."""


class FaithfulnessError(InputError):
    """Bad arguments to the faithfulness check (e.g. a distractor without a target)."""


class DatasetError(InputError):
    """A prompt list or an output file of dataset mode cannot be used."""


class RouteDiffError(InputError):
    """The two routes do not describe the same prompt, position and threshold."""


class AttendError(InputError):
    """A QK-attribution query names a layer, head, query or source the run does not have."""


class UnsupportedAnalysisError(LlmFlowError):
    """The model runs, but this analysis cannot be computed exactly for its design (e.g. QK
    attribution where the attention rotates its queries and keys out of sight)."""


class SelfCheckError(LlmFlowError):
    """A decomposition identity failed: the parts do not sum to the whole.

    Raised instead of returning a silently wrong graph. The message names the layer and block.
    """


class DistributedError(LlmFlowError):
    """A Ray job cannot run: ray is not installed, the cluster cannot be reached or lacks the
    resources asked for, or a worker died."""


class ExportError(LlmFlowError):
    """A figure cannot be written in the asked format (e.g. PNG/SVG without kaleido)."""


class SaeError(InputError):
    """An SAE cannot be read or used: a missing or malformed folder, another hook, a node with
    no SAE configured."""


class CorpusError(InputError):
    """A corpus cannot be read (missing file, bad JSON line, dataset offline) or an index cannot
    be built, merged or queried as asked (unknown unit, layers it does not cover)."""


class IndexNotFoundError(CorpusError):
    """No corpus index of this model and corpus covers the unit asked for yet."""
