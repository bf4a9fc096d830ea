"""App tests of the parts beyond the graph (issue 5): "why A instead of B?", ablation and the
faithfulness check, with Streamlit's AppTest on the tiny local models.

The tiny models' vocabulary is ``w0 … w60`` (one token each), so ``w3`` vs ``w4`` is a valid
contrast and ``w3 w4`` is two tokens.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app import figures, state
from app.selection import parse_selection
from app.state import AblatedGraphKey
from llm_flow.analyses.faithfulness import DEFAULT_SEEDS
from llm_flow.analyses.route_diff import RouteDiff
from llm_flow.engine.routes import find_route
from tests.app.test_app import _offline, assert_serving, errors, route_caption, start

__all__ = ["_offline"]  # the autouse fixture: offline, and the tiny models' config

CONTRAST = {"target": "w3", "distractor": "w4"}


def effects(at: AppTest) -> pd.DataFrame:
    tables = [d.value for d in at.dataframe if "direct_effect" in d.value.columns]
    assert len(tables) == 1
    return tables[0]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def select_row(at: AppTest, row: int) -> None:
    """What a click on a table row does: Streamlit stores the row in the table's state."""
    at.session_state[state.EFFECTS_TABLE] = {
        "selection": {"rows": [row], "columns": [], "cells": []}
    }
    at.run()


def highlighted(at: AppTest) -> bool:
    """Whether the graph draws the red selection ring."""
    charts = [c for c in at.get("plotly_chart") if "customdata" in c.proto.spec]
    spec: dict[str, Any] = json.loads(charts[0].proto.spec)
    return any(
        t.get("marker", {}).get("symbol") == "circle-open" for t in spec["data"] if "marker" in t
    )


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
    assert {"head", "ffn", "neuron"} <= set(table["kind"])
    strength = table[["direct_effect", "attribution"]].abs().max(axis=1)
    assert strength.is_monotonic_decreasing  # strongest first

    ids = figures.effect_ids(table)
    head_row = next(i for i, k in enumerate(table["kind"]) if k == "head")
    select_row(at, head_row)
    assert_serving(at)
    assert at.session_state[state.SELECTION] == ids[head_row]
    assert at.subheader[-1].value.startswith("Attention ")
    assert highlighted(at)
    # The panel preselects the row's head, not the head that contributes most.
    assert at.selectbox(key=f"head|{ids[head_row]}").value == table["head"][head_row]

    ffn_row = next(i for i, k in enumerate(table["kind"]) if k == "ffn")
    select_row(at, ffn_row)
    assert_serving(at)
    assert at.subheader[-1].value == f"FFN block {ids[ffn_row]}"

    # A graph click after the row selection wins: the unchanged row does not re-select.
    at.session_state[state.SELECTION] = "X0_0"
    at.run()
    assert at.subheader[-1].value == "Residual X0_0"


def test_the_threshold_rebuilds_the_table_without_another_backward_pass() -> None:
    at = start({**CONTRAST, "threshold": "0"})
    assert_serving(at)
    passes = state.store().contrast_effects.computed
    rows = len(effects(at))
    at.slider(key=state.THRESHOLD).set_value(0.1).run()
    assert_serving(at)
    assert len(effects(at)) < rows  # a smaller route has fewer heads and blocks
    assert state.store().contrast_effects.computed == passes


def test_each_table_row_maps_to_an_element_of_the_graph() -> None:
    at = start({**CONTRAST, "threshold": "0"})
    table = effects(at)
    for selection_id in figures.effect_ids(table):
        parsed = parse_selection(selection_id, 3, 7)  # tiny: 3 layers, 6 words + BOS
        assert parsed is not None and parsed.kind in ("attention", "ffn")


def test_bad_contrast_tokens_show_an_error_and_the_app_keeps_serving() -> None:
    at = start()
    at.text_input(key=state.TARGET).input("w3 w4")
    at.text_input(key=state.DISTRACTOR).input("w4").run()
    assert "2 tokens" in errors(at) and "one token" in errors(at)
    assert route_caption(at) and not at.exception  # the graph is still there

    at.text_input(key=state.TARGET).input("w4").run()
    assert "same token" in errors(at)
    at.text_input(key=state.DISTRACTOR).input("").run()
    assert "distractor is empty" in errors(at)
    assert route_caption(at) and not at.exception

    at.text_input(key=state.DISTRACTOR).input("w5").run()
    assert_serving(at)
    assert "logit difference" in metrics(at)


def test_ablating_heads_shows_before_and_after() -> None:
    at = start(CONTRAST)
    at.multiselect(key=state.ABLATE_HEADS).set_value(["1.0", "2.3"])
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    before = next(d.value for d in at.dataframe if list(d.value.columns) == ["token", "prob"])
    assert len(before) == 5
    tables = [d.value for d in at.dataframe if list(d.value.columns) == ["token", "prob"]]
    assert len(tables) == 2  # before and after
    assert any("Ablated (zero): heads 1.0, 2.3" in c.value for c in at.caption)
    labels = [m.label for m in at.metric]
    assert labels.count("logit difference") == 3  # contrast, before, after
    contrast_ld, before_ld = float(at.metric[2].value), float(at.metric[3].value)
    assert before_ld == pytest.approx(contrast_ld, abs=0.011)  # before = the traced run
    assert at.metric[4].delta  # the change is shown

    # The result stays while the user moves the threshold.
    at.slider(key=state.THRESHOLD).set_value(0.1).run()
    assert any("Ablated (zero)" in c.value for c in at.caption)


def test_mean_ablation_of_neurons_and_the_selected_edge() -> None:
    at = start({"threshold": "0"})
    at.session_state[state.SELECTION] = "I0_1->A1_5"
    at.run()
    assert_serving(at)
    at.radio(key=state.ABLATION_MODE).set_value("mean").run()
    assert at.selectbox(key=state.MEAN_FILE).options == ["more.txt", "preloaded.jsonl"]
    at.text_input(key=state.ABLATE_NEURONS).input("0.5, 2.47")
    at.checkbox(key=state.ABLATE_EDGE).check()
    means = state.store().means.computed
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    caption = next(c.value for c in at.caption if c.value.startswith("Ablated"))
    assert "mean over more.txt" in caption
    assert "neurons 0.5, 2.47" in caption and "edges 1:1>5" in caption
    assert state.store().means.computed == means + 1
    assert "logit difference" not in [m.label for m in at.metric]  # no contrast given


DIFF_COLUMNS = ["status", "kind", "edge", "tokens", "before", "after", "change"]


def diff_table(at: AppTest) -> pd.DataFrame:
    tables = [d.value for d in at.dataframe if list(d.value.columns) == DIFF_COLUMNS]
    assert len(tables) == 1
    return tables[0]


def diff_caption(at: AppTest) -> str:
    return next(c.value for c in at.caption if "edges kept" in c.value)


def shown_diff(at: AppTest, threshold: float) -> RouteDiff:
    """The route diff recomputed here from the app's caches: the trace and the ablated graph."""
    key: state.AblationKey = at.session_state[state.SHOWN_ABLATION]
    trace = state.cached_trace(key.trace)
    ablated = state.cached_ablated_graph(AblatedGraphKey(key.trace, key.ablation, key.means))
    assert trace is not None and ablated is not None
    return RouteDiff(
        find_route(trace.graph, [key.position], threshold),
        find_route(ablated, [key.position], threshold),
    )


def test_ablation_draws_the_route_before_and_after() -> None:
    at = start({"threshold": "0.02"})
    at.multiselect(key=state.ABLATE_HEADS).set_value(["0.0", "0.1", "0.2", "0.3"])
    graphs = state.store().ablated_graphs.computed
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    assert state.store().ablated_graphs.computed == graphs + 1
    diff = shown_diff(at, 0.02)
    counts = diff.to_dict()["n_edges"]
    assert counts["lost"] + counts["gained"] > 0  # ablating every head of layer 0 moves it
    assert f"{counts['kept']} edges kept, {counts['lost']} lost" in diff_caption(at)
    table = diff_table(at)
    want = diff.edges()[: len(table)]
    assert list(table["edge"]) == [f"{e.source} → {e.target}" for e in want]
    assert list(table["status"]) == [e.status for e in want]
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    legend = [t["name"] for c in charts for t in c["data"] if t.get("showlegend") is not False]
    assert f"lost ({counts['lost']})" in legend and f"gained ({counts['gained']})" in legend

    # A new threshold redraws the diff from the cached graphs: no model runs.
    at.slider(key=state.THRESHOLD).set_value(0.1).run()
    assert_serving(at)
    assert state.store().ablated_graphs.computed == graphs + 1
    counts = shown_diff(at, 0.1).to_dict()["n_edges"]
    assert f"{counts['kept']} edges kept, {counts['lost']} lost" in diff_caption(at)


def test_an_ablated_edge_carries_nothing_after() -> None:
    at = start({"threshold": "0"})
    at.session_state[state.SELECTION] = "I0_1->A1_5"
    at.run()
    at.checkbox(key=state.ABLATE_EDGE).check()
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    table = diff_table(at)
    row = table[table["edge"] == "I0_1 → A1_5"]
    assert len(row) == 1  # the cut edge changed most: it is listed
    assert float(row["after"].iloc[0]) == 0.0
    assert float(row["change"].iloc[0]) == pytest.approx(-float(row["before"].iloc[0]))
    assert float(row["before"].iloc[0]) > 0


def test_bad_ablations_show_an_error_and_the_app_keeps_serving() -> None:
    at = start()
    at.button(key="run_ablation").click().run()
    assert "nothing to ablate" in errors(at).lower()
    assert route_caption(at) and not at.exception

    at.text_input(key=state.ABLATE_NEURONS).input("five")
    at.button(key="run_ablation").click().run()
    assert "LAYER.NEURON" in errors(at)
    at.text_input(key=state.ABLATE_NEURONS).input("0.48")  # the tiny model has 48 neurons
    at.button(key="run_ablation").click().run()
    assert "out of range" in errors(at) and "neurons 0..47" in errors(at)
    assert route_caption(at) and not at.exception

    at.text_input(key=state.ABLATE_NEURONS).input("0.47")
    at.button(key="run_ablation").click().run()
    assert_serving(at)


def test_faithfulness_reports_route_complement_and_random_heads() -> None:
    at = start({**CONTRAST, "threshold": "0"})
    at.radio(key=state.ABLATION_MODE).set_value("mean").run()
    at.button(key="run_faithfulness").click().run()
    assert_serving(at)
    report = next(d.value for d in at.dataframe if "share of full" in d.value.columns)
    rows = dict(zip(report["ablated"], report["share of full"], strict=True))
    assert rows["nothing (full model)"] == 1.0
    # At τ = 0 the route is everything that reaches the output: keeping it keeps it all.
    assert rows["everything but the route"] == pytest.approx(1.0, abs=1e-4)
    assert "logit diff" in report.columns
    assert any("head positions" in c.value and "on the route" in c.value for c in at.caption)


def test_faithfulness_without_a_contrast_uses_the_log_prob() -> None:
    at = start()
    at.button(key="run_faithfulness").click().run()  # zero ablation: no prompt file needed
    assert_serving(at)
    report = next(d.value for d in at.dataframe if "share of full" in d.value.columns)
    assert "target log-prob" in report.columns


def test_faithfulness_takes_the_draws_and_the_graph_s_renormalize_setting() -> None:
    at = start({"threshold": "0.02"})
    assert at.number_input(key=state.FAITHFULNESS_DRAWS).value == DEFAULT_SEEDS
    at.number_input(key=state.FAITHFULNESS_DRAWS).set_value(2)
    at.toggle(key=state.RENORMALIZE).set_value(False)
    at.button(key="run_faithfulness").click().run()
    assert_serving(at)
    key: state.FaithfulnessKey = at.session_state[state.SHOWN_FAITHFULNESS]  # what is shown
    report = state.cached_faithfulness(key)
    assert report is not None
    assert (key.draws, key.renormalize) == (2, False)
    assert len(report.random) == 2 and report.seeds == (0, 1) and not report.renormalize
    table = next(d.value for d in at.dataframe if "share of full" in d.value.columns)
    assert "as many random heads (2 draws)" in list(table["ablated"])
    assert any("over 2 draws" in c.value for c in at.caption)

    # Other draws are another report, not the cached one.
    computed = state.store().faithfulness.computed
    at.number_input(key=state.FAITHFULNESS_DRAWS).set_value(3)
    at.button(key="run_faithfulness").click().run()
    assert state.store().faithfulness.computed == computed + 1
    assert any("over 3 draws" in c.value for c in at.caption)


def test_demo_mode_offers_zero_ablation_only(demo_config_path: Any) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FLOW_CONFIG", str(demo_config_path))
        at = start()
    assert_serving(at)
    assert at.radio(key=state.ABLATION_MODE).options == ["zero"]
