"""Checks of user input shared by every front end: one function per kind of value, each
raising an :class:`~llm_flow.errors.LlmFlowError` subclass whose message says what was wrong,
what is allowed and how to fix it, in words that suit the CLI, the app and the Python API alike
(no command-line flag names).
"""

from __future__ import annotations

from llm_flow.errors import InputError, PositionError, PromptError, ThresholdError


def check_position(position: int, n_tokens: int) -> int:
    """``position`` normalized into ``0..n_tokens-1`` (negative counts from the end)."""
    if not -n_tokens <= position < n_tokens:
        raise PositionError(
            f"position {position} is outside the prompt's {n_tokens} tokens; valid positions "
            f"are 0..{n_tokens - 1}, or -{n_tokens}..-1 counting from the end"
        )
    return position % n_tokens


def check_threshold(threshold: float) -> float:
    """A threshold τ on edge weights, in [0, 1]."""
    if not 0.0 <= threshold <= 1.0:
        raise ThresholdError(f"the threshold must be between 0 and 1, got {threshold}")
    return threshold


def check_attention_floor(floor: float) -> float:
    """The floor ε below which attention edges are not stored, in [0, 1) (0 keeps them all)."""
    if not 0.0 <= floor < 1.0:
        raise InputError(
            f"the attention floor must be at least 0 and below 1 (e.g. 1e-4), got {floor}"
        )
    return floor


def check_prompt(prompt: str, limit: int | None = None) -> str:
    """A prompt with some text, and at most ``limit`` characters when a limit is set (the
    config's ``max_user_string_length``)."""
    if not prompt.strip():
        raise PromptError("the prompt is empty; give some text to analyse")
    if limit is not None and len(prompt) > limit:
        raise PromptError(
            f"the prompt has {len(prompt)} characters, more than the limit of {limit} "
            "(the config's max_user_string_length); shorten it or raise the limit"
        )
    return prompt


def check_at_least(what: str, value: int, minimum: int) -> int:
    """A count such as the number of top tokens or random draws."""
    if value < minimum:
        raise InputError(f"{what} must be at least {minimum}, got {value}")
    return value
