"""Tests for app/selection.py: selection strings (URL-safe, graph-checked) and click events."""

from __future__ import annotations

from typing import Any

import pytest

from app.selection import (
    attention_edge,
    clicked,
    effect_selection,
    parse_selection,
    selected_row,
)

L, T = 3, 5


@pytest.mark.parametrize(
    "text",
    ["X0_0", "A0_4", "I2_3", "M1_2", "X0_1->A0_3", "I1_0->A2_4", "I0_2->A1_2"],
)
def test_selection_strings_round_trip(text: str) -> None:
    sel = parse_selection(text, L, T)
    assert sel is not None and sel.id == text


def test_kinds() -> None:
    edge = parse_selection("I1_0->A2_4", L, T)
    assert edge == attention_edge(2, 4, 0)
    assert (edge.kind, edge.layer, edge.token, edge.source) == ("attention", 2, 4, 0)
    ffn = parse_selection("M1_2", L, T)
    assert ffn is not None and (ffn.kind, ffn.layer, ffn.token) == ("ffn", 1, 2)
    node = parse_selection("A0_4", L, T)
    assert node is not None and (node.kind, node.node) == ("residual", "A")
    embedding = parse_selection("X0_3", L, T)
    assert embedding is not None and (embedding.kind, embedding.node) == ("residual", "X")


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "A3_0",  # layer out of range
        "I0_5",  # token out of range
        "X1_0",  # embeddings have no layer
        "Q0_0",
        "I0_3->A1_2",  # source after target
        "I1_0->A1_2",  # source must be the layer below
        "X0_0->A1_2",
        "I0_0->I1_2",  # attention edges end in A nodes
        "A0_0 ",
        "pos:3",
    ],
)
def test_stale_or_forged_selections_are_rejected(text: str | None) -> None:
    assert parse_selection(text, L, T) is None


def test_clicked_reads_streamlits_event() -> None:
    # The shape Streamlit 1.67 hands to on_select (seen in the browser test).
    event: dict[str, Any] = {
        "selection": {
            "points": [
                {
                    "curve_number": 18,
                    "point_number": 3,
                    "point_index": 3,
                    "x": 2.3,
                    "y": 1.65,
                    "customdata": "X0_0->A0_3",
                }
            ],
            "point_indices": [3],
            "box": [],
            "lasso": [],
        }
    }
    assert clicked(event) == "X0_0->A0_3"
    event["selection"]["points"][0]["customdata"] = ["M1_2", 0.5]
    assert clicked(event) == "M1_2"
    assert clicked({"selection": {"points": [{"x": 1, "y": 2}]}}) is None
    assert clicked({"selection": {"points": []}}) is None
    assert clicked(None) is None


def test_effect_rows_select_their_edge_or_block() -> None:
    assert effect_selection("head", 3, 1, 4) == "I2_1->A3_4"
    assert effect_selection("head", 0, 2, 2) == "X0_2->A0_2"
    assert effect_selection("ffn", 5, 7, 7) == "M5_7"
    assert effect_selection("neuron", 5, 7, 7) == "M5_7"
    for text in ("I2_1->A3_4", "X0_2->A0_2", "M5_7"):
        assert parse_selection(text, 6, 8) is not None


def test_selected_row_of_a_dataframe_event() -> None:
    assert selected_row({"selection": {"rows": [3], "columns": [], "cells": []}}) == 3
    assert selected_row({"selection": {"rows": [], "columns": [], "cells": []}}) is None
    assert selected_row({"selection": {"rows": [0, 2]}}) == 0
    assert selected_row(None) is None
    assert selected_row({"selection": "nonsense"}) is None
