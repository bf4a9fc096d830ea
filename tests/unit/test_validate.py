"""Tests for llm_flow/validate.py: each check accepts what is valid, and its error says what is
valid without naming a command-line flag."""

from __future__ import annotations

import pytest

from llm_flow.errors import InputError, LlmFlowError, PositionError, PromptError, ThresholdError
from llm_flow.validate import (
    check_at_least,
    check_attention_floor,
    check_position,
    check_prompt,
    check_threshold,
)


@pytest.mark.parametrize(("position", "want"), [(0, 0), (4, 4), (-1, 4), (-5, 0)])
def test_positions_are_normalized(position: int, want: int) -> None:
    assert check_position(position, 5) == want


@pytest.mark.parametrize("position", [5, 50, -6])
def test_positions_outside_the_prompt_are_refused(position: int) -> None:
    with pytest.raises(PositionError) as info:
        check_position(position, 5)
    message = str(info.value)
    assert f"position {position} is outside the prompt's 5 tokens" in message
    assert "0..4" in message and "-5..-1" in message and "--" not in message
    assert isinstance(info.value, IndexError) and isinstance(info.value, LlmFlowError)


@pytest.mark.parametrize("threshold", [0.0, 0.04, 1.0])
def test_thresholds_in_the_unit_interval_pass(threshold: float) -> None:
    assert check_threshold(threshold) == threshold


@pytest.mark.parametrize("threshold", [-0.01, 1.5, float("nan")])
def test_thresholds_outside_are_refused(threshold: float) -> None:
    with pytest.raises(ThresholdError, match="between 0 and 1") as info:
        check_threshold(threshold)
    assert isinstance(info.value, ValueError) and "--" not in str(info.value)


@pytest.mark.parametrize("floor", [0.0, 1e-4, 0.5])
def test_attention_floors_in_zero_to_one_pass(floor: float) -> None:
    assert check_attention_floor(floor) == floor


@pytest.mark.parametrize("floor", [-1e-4, 1.0, float("nan")])
def test_attention_floors_outside_are_refused(floor: float) -> None:
    with pytest.raises(InputError, match="attention floor must be at least 0 and below 1"):
        check_attention_floor(floor)


def test_prompts_need_text_and_respect_the_limit() -> None:
    assert check_prompt("hello", 5) == "hello"
    assert check_prompt("x" * 10_000) == "x" * 10_000  # no limit
    with pytest.raises(PromptError, match="empty"):
        check_prompt(" \n\t ")
    with pytest.raises(PromptError, match="6 characters, more than the limit of 5"):
        check_prompt("hello!", 5)


def test_counts_have_a_minimum() -> None:
    assert check_at_least("the number of draws", 3, 1) == 3
    with pytest.raises(InputError, match="the number of draws must be at least 1, got 0"):
        check_at_least("the number of draws", 0, 1)
