"""How the explorer shows what went wrong: every error a user can cause becomes ``st.error``
saying what was wrong and what to do, and a bug keeps the app serving (its traceback goes to the
server log, never to the page)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import streamlit as st
import torch

from llm_flow.errors import (
    ConfigError,
    DeviceError,
    LlmFlowError,
    ModelLoadError,
    OfflineError,
    PromptError,
)
from llm_flow.io.text import markdown_text

_log = logging.getLogger("llm_flow.app")

_HINTS: list[tuple[type[LlmFlowError], str]] = [
    (OfflineError, "Choose a packaged model in the sidebar, or connect to the internet once."),
    (ModelLoadError, "Choose another model in the sidebar, or fix this model's config entry."),
    (DeviceError, "Choose the cpu device (and float32) in the sidebar."),
    (PromptError, "Edit the prompt or choose another one in the sidebar."),
    (ConfigError, "Fix the custom model name in the sidebar."),
]


class NeedsInput(Exception):
    """The page cannot go on until the user fills something in (not an error)."""


def sentence(message: str) -> str:
    """A core message (lower case, maybe ending in a full stop) as one Markdown-safe sentence."""
    text = message.rstrip(".")
    return f"{markdown_text(text[:1].upper() + text[1:])}."


def show_error(exc: LlmFlowError | str, hint: str | None = None) -> None:
    """``st.error`` with the message as a sentence and, on its own line, what to do."""
    message = exc if isinstance(exc, str) else str(exc) or type(exc).__name__
    st.error(sentence(message) + (f"  \n{hint}" if hint else ""))


def guarded(view: Callable[[], None]) -> None:
    """Run ``view``; an error a user can fix becomes ``st.error`` where the view was, and the
    page stops there (``st.stop``)."""
    try:
        view()
    except NeedsInput as need:
        st.info(markdown_text(str(need)))
        st.stop()
    except LlmFlowError as exc:
        hint = next(
            (h for kind, h in _HINTS if isinstance(exc, kind)), "Change the input and retry."
        )
        show_error(exc, hint)
        st.stop()
    except torch.cuda.OutOfMemoryError:
        st.error(
            "The GPU ran out of memory.  \nTry a shorter prompt, float16/bfloat16, or the cpu."
        )
        st.stop()
    except Exception as exc:  # a bug: keep serving, log the traceback for the operator
        _log.exception("llm-flow app error")
        st.error(
            f"Something went wrong: {markdown_text(f'{type(exc).__name__}: {exc}')}.  \n"
            "Try another prompt or model; if it persists, report it with this page's URL (the "
            "server log has the details)."
        )
        st.stop()
