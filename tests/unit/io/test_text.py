"""Tests for llm_flow/io/text.py: the one way positions and weights are written."""

from __future__ import annotations

from llm_flow.io.text import position_text, weight_text


def test_the_last_position_names_its_range_counted_from_zero() -> None:
    # issue 12: "token 13 of 14" for the last of 14 read as one short of the end
    assert position_text(13, 14) == "token 13 of 0–13"
    assert position_text(0) == "token 0"


def test_weights_say_when_renormalized() -> None:
    assert weight_text(0.30649, True) == "0.306 (renormalized)"
    assert weight_text(0.30649, False) == "0.306"
