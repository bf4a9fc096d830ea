"""Tests for app/views/contrast.py: "why A instead of B?" — the logits, and the effect table
whose rows select graph elements, with AppTest on the tiny local models (``w3 w4`` is two
tokens of their vocabulary).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app import cache, session
from app.figures.tables import effect_ids
from app.selection import parse_selection
from tests.app.apptest import (
    CONTRAST,
    assert_serving,
    errors,
    graph_spec,
    metrics,
    route_caption,
    start,
)

pytestmark = pytest.mark.usefixtures("offline")


def effects(at: AppTest) -> pd.DataFrame:
    tables = [d.value for d in at.dataframe if "direct_effect" in d.value.columns]
    assert len(tables) == 1
    return tables[0]


def select_row(at: AppTest, row: int) -> None:
    """What a click on a table row does: Streamlit stores the row in the table's state."""
    at.session_state[session.EFFECTS_TABLE] = {
        "selection": {"rows": [row], "columns": [], "cells": []}
    }
    at.run()


def highlighted(at: AppTest) -> bool:
    """Whether the graph draws the red selection ring."""
    data: list[dict[str, Any]] = graph_spec(at)["data"]
    return any(t.get("marker", {}).get("symbol") == "circle-open" for t in data if "marker" in t)


def test_contrast_shows_logits_and_a_table_whose_rows_select_graph_elements() -> None:
    at = start({**CONTRAST, "threshold": "0"})
    assert_serving(at)
    shown = metrics(at)
    target, distractor = float(shown["logit w3"]), float(shown["logit w4"])
    assert float(shown["logit difference"]) == pytest.approx(target - distractor, abs=0.011)
    assert at.query_params["target"] == "w3" and at.query_params["distractor"] == "w4"

    table = effects(at)
    for column in ("kind", "layer", "head", "neuron", "source", "target", "weight", "attribution"):
        assert column in table.columns
    assert "small weight, large effect" in table.columns  # issue 12: proximity ≠ effect
    assert any("is *proximity*" in c.value or "proximity" in c.value for c in at.caption)
    assert {"head", "ffn", "neuron"} <= set(table["kind"])
    strength = table[["direct_effect", "attribution"]].abs().max(axis=1)
    assert strength.is_monotonic_decreasing  # strongest first

    ids = effect_ids(table)
    head_row = next(i for i, k in enumerate(table["kind"]) if k == "head")
    select_row(at, head_row)
    assert_serving(at)
    assert at.session_state[session.SELECTION] == ids[head_row]
    assert at.subheader[-1].value.startswith("Attention ")
    assert highlighted(at)
    # The panel preselects the row's head, not the head that contributes most.
    assert at.selectbox(key=f"head|{ids[head_row]}").value == table["head"][head_row]

    ffn_row = next(i for i, k in enumerate(table["kind"]) if k == "ffn")
    select_row(at, ffn_row)
    assert_serving(at)
    assert at.subheader[-1].value == f"FFN block {ids[ffn_row]}"

    # A graph click after the row selection wins: the unchanged row does not re-select.
    at.session_state[session.SELECTION] = "X0_0"
    at.run()
    assert at.subheader[-1].value == "Residual X0_0"


def test_the_threshold_rebuilds_the_table_without_another_backward_pass() -> None:
    at = start({**CONTRAST, "threshold": "0"})
    assert_serving(at)
    passes = cache.store().contrast_effects.computed
    rows = len(effects(at))
    at.slider(key=session.THRESHOLD).set_value(0.1).run()
    assert_serving(at)
    assert len(effects(at)) < rows  # a smaller route has fewer heads and blocks
    assert cache.store().contrast_effects.computed == passes


def test_each_table_row_maps_to_an_element_of_the_graph() -> None:
    at = start({**CONTRAST, "threshold": "0"})
    table = effects(at)
    for selection_id in effect_ids(table):
        parsed = parse_selection(selection_id, 3, 7)  # tiny: 3 layers, 6 words + BOS
        assert parsed is not None and parsed.kind in ("attention", "ffn")


def test_bad_contrast_tokens_show_an_error_and_the_app_keeps_serving() -> None:
    at = start()
    at.text_input(key=session.TARGET).input("w3 w4")
    at.text_input(key=session.DISTRACTOR).input("w4").run()
    assert "2 tokens" in errors(at) and "one token" in errors(at)
    assert route_caption(at) and not at.exception  # the graph is still there

    at.text_input(key=session.TARGET).input("w4").run()
    assert "same token" in errors(at)
    at.text_input(key=session.DISTRACTOR).input("").run()
    assert "distractor is empty" in errors(at)
    assert route_caption(at) and not at.exception

    at.text_input(key=session.DISTRACTOR).input("w5").run()
    assert_serving(at)
    assert "logit difference" in metrics(at)


def test_an_expert_row_opens_its_block_with_that_expert_chosen() -> None:
    at = start({**CONTRAST, "model": "tiny-moe", "threshold": "0"})
    assert_serving(at)
    table = effects(at)
    assert {"expert", "shared_expert"} <= set(table["kind"]) and "neuron" not in set(table["kind"])
    ids = effect_ids(table)
    row = [i for i, k in enumerate(table["kind"]) if k == "expert"][-1]  # the weakest expert
    select_row(at, row)
    assert_serving(at)
    assert at.subheader[-1].value == f"FFN block {ids[row]}"
    # The panel preselects the row's expert (not the block's strongest one).
    assert at.selectbox(key=f"expert|{ids[row]}").value == f"e{table['expert'][row]}"
