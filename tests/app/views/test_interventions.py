"""Tests for app/views/interventions.py: ablation (before/after and the route diff) and the
faithfulness check, with AppTest on the tiny local models."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app import cache, session
from app.cache import AblationKey, FaithfulnessKey
from llm_flow.analyses.faithfulness import DEFAULT_SEEDS
from llm_flow.analyses.route_diff import RouteDiff
from llm_flow.engine.routes import find_route
from tests.app.apptest import CONTRAST, assert_serving, errors, route_caption, start

pytestmark = pytest.mark.usefixtures("offline")


def test_ablating_heads_shows_before_and_after() -> None:
    at = start(CONTRAST)
    at.multiselect(key=session.ABLATE_HEADS).set_value(["1.0", "2.3"])
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
    at.slider(key=session.THRESHOLD).set_value(0.1).run()
    assert any("Ablated (zero)" in c.value for c in at.caption)


def test_mean_ablation_of_neurons_and_the_selected_edge() -> None:
    at = start({"threshold": "0"})
    at.session_state[session.SELECTION] = "I0_1->A1_5"
    at.run()
    assert_serving(at)
    at.radio(key=session.ABLATION_MODE).set_value("mean").run()
    assert at.selectbox(key=session.MEAN_FILE).options == ["more.txt", "preloaded.jsonl"]
    at.text_input(key=session.ABLATE_NEURONS).input("0.5, 2.47")
    at.checkbox(key=session.ABLATE_EDGE).check()
    means = cache.store().means.computed
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    caption = next(c.value for c in at.caption if c.value.startswith("Ablated"))
    assert "mean over more.txt" in caption
    assert "neurons 0.5, 2.47" in caption and "edges 1:1>5" in caption
    assert cache.store().means.computed == means + 1
    assert "logit difference" not in [m.label for m in at.metric]  # no contrast given


DIFF_COLUMNS = ["status", "shift", "kind", "edge", "tokens", "before", "after", "change"]


def diff_table(at: AppTest) -> pd.DataFrame:
    tables = [d.value for d in at.dataframe if list(d.value.columns) == DIFF_COLUMNS]
    assert len(tables) == 1
    return tables[0]


def diff_caption(at: AppTest) -> str:
    return next(c.value for c in at.caption if "edges lost" in c.value)


def shown_diff(at: AppTest, threshold: float) -> RouteDiff:
    """The route diff recomputed here from the app's cached ablation: its trace before (the
    view's own) and the traced ablated run."""
    key: AblationKey = at.session_state[session.SHOWN_ABLATION]
    result = cache.cached_ablation(key)
    view = cache.cached_trace(key.trace)
    assert result is not None and result.traces is not None and view is not None
    before, after = result.traces
    assert before is view.trace  # the ablation re-ran nothing of the view
    return RouteDiff(
        find_route(before.graph, [key.position], threshold),
        find_route(after.graph, [key.position], threshold),
    )


def test_ablation_draws_the_route_before_and_after() -> None:
    at = start({"threshold": "0.02"})
    at.multiselect(key=session.ABLATE_HEADS).set_value(["0.0", "0.1", "0.2", "0.3"])
    ablations = cache.store().ablations.computed
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    assert cache.store().ablations.computed == ablations + 1
    diff = shown_diff(at, 0.02)
    counts = diff.counts()
    assert counts["lost"] + counts["gained"] > 0  # ablating every head of layer 0 moves it
    assert f"{counts['lost']} edges lost (red), {counts['gained']} gained" in diff_caption(at)
    assert f"{counts['kept']} kept: {counts['weakened']} weakened" in diff_caption(at)
    table = diff_table(at)
    want = diff.edges()[: len(table)]
    assert list(table["edge"]) == [f"{e.source} → {e.target}" for e in want]
    assert list(table["status"]) == [e.status for e in want]
    assert list(table["shift"]) == [e.shift() or "" for e in want]  # issue 12: how kept moved
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    legend = [t["name"] for c in charts for t in c["data"] if t.get("showlegend") is not False]
    assert f"lost ({counts['lost']})" in legend and f"gained ({counts['gained']})" in legend

    # A new threshold redraws the diff from the cached graphs: no model runs.
    traces = cache.store().traces.computed
    at.slider(key=session.THRESHOLD).set_value(0.1).run()
    assert_serving(at)
    assert cache.store().ablations.computed == ablations + 1
    assert cache.store().traces.computed == traces
    counts = shown_diff(at, 0.1).counts()
    assert f"{counts['lost']} edges lost (red), {counts['gained']} gained" in diff_caption(at)
    assert f"{counts['kept']} kept: {counts['weakened']} weakened" in diff_caption(at)


def test_an_ablated_edge_carries_nothing_after() -> None:
    # At τ = 0.005 (the slider's first step, above the graph's attention floor, so both routes
    # are exact) the route keeps nearly every edge into the output; cutting one of them changes
    # it most.
    at = start({"threshold": "0.005"})
    at.session_state[session.SELECTION] = "I1_4->A2_6"
    at.run()
    at.checkbox(key=session.ABLATE_EDGE).check()
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    table = diff_table(at)
    row = table[table["edge"] == "I1_4 → A2_6"]
    assert len(row) == 1  # the cut edge changed most: it is listed
    assert row["status"].iloc[0] == "lost"
    assert float(row["after"].iloc[0]) == 0.0
    assert float(row["change"].iloc[0]) == pytest.approx(-float(row["before"].iloc[0]))
    assert float(row["before"].iloc[0]) > 0.005


def test_bad_ablations_show_an_error_and_the_app_keeps_serving() -> None:
    at = start()
    at.button(key="run_ablation").click().run()
    assert "nothing to ablate" in errors(at).lower()
    assert route_caption(at) and not at.exception

    at.text_input(key=session.ABLATE_NEURONS).input("five")
    at.button(key="run_ablation").click().run()
    assert "LAYER.NEURON" in errors(at)
    at.text_input(key=session.ABLATE_NEURONS).input("0.48")  # the tiny model has 48 neurons
    at.button(key="run_ablation").click().run()
    assert "out of range" in errors(at) and "neurons 0..47" in errors(at)
    assert route_caption(at) and not at.exception

    at.text_input(key=session.ABLATE_NEURONS).input("0.47")
    at.button(key="run_ablation").click().run()
    assert_serving(at)


def test_faithfulness_reports_route_complement_and_random_heads() -> None:
    at = start({**CONTRAST, "threshold": "0"})
    at.radio(key=session.ABLATION_MODE).set_value("mean").run()
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
    assert at.number_input(key=session.FAITHFULNESS_DRAWS).value == DEFAULT_SEEDS
    at.number_input(key=session.FAITHFULNESS_DRAWS).set_value(2)
    at.toggle(key=session.RENORMALIZE).set_value(False)
    at.button(key="run_faithfulness").click().run()
    assert_serving(at)
    key: FaithfulnessKey = at.session_state[session.SHOWN_FAITHFULNESS]  # what is shown
    report = cache.cached_faithfulness(key)
    assert report is not None
    assert (key.draws, key.renormalize) == (2, False)
    assert len(report.random) == 2 and report.seeds == (0, 1) and not report.renormalize
    table = next(d.value for d in at.dataframe if "share of full" in d.value.columns)
    assert "as many random heads (2 draws)" in list(table["ablated"])
    assert any("over 2 draws" in c.value for c in at.caption)

    # Other draws are another report, not the cached one.
    computed = cache.store().faithfulness.computed
    at.number_input(key=session.FAITHFULNESS_DRAWS).set_value(3)
    at.button(key="run_faithfulness").click().run()
    assert cache.store().faithfulness.computed == computed + 1
    assert any("over 3 draws" in c.value for c in at.caption)


def test_demo_mode_offers_zero_ablation_only(demo_config_path: Any) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FLOW_CONFIG", str(demo_config_path))
        at = start()
    assert_serving(at)
    assert at.radio(key=session.ABLATION_MODE).options == ["zero"]


def test_a_mixture_of_experts_offers_experts_instead_of_neurons() -> None:
    at = start({"model": "tiny-moe", "threshold": "0"})
    assert_serving(at)
    experts = at.multiselect(key=session.ABLATE_EXPERTS)
    assert "2.3" in experts.options and len(experts.options) == 3 * 4  # 3 MoE layers × 4
    assert not [t for t in at.text_input if t.key == session.ABLATE_NEURONS]  # no dense FFN
    at.radio(key=session.ABLATION_MODE).set_value("mean").run()
    at.multiselect(key=session.ABLATE_EXPERTS).set_value(["0.1", "2.3"])
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    caption = next(c.value for c in at.caption if c.value.startswith("Ablated"))
    assert "experts 0.1, 2.3" in caption and "mean over more.txt" in caption


def warnings(at: AppTest) -> str:
    return " | ".join(w.value for w in at.warning).replace("\\", "")  # Markdown escapes


def test_a_faithfulness_table_from_other_settings_is_marked_stale_and_runs_again() -> None:
    """Issue 12: after moving τ (or the mode) the heading said τ = 0.045 above a τ = 0.040
    table; the table must say it is stale, what changed, and offer to run again."""
    at = start({"threshold": "0.04"})
    at.number_input(key=session.FAITHFULNESS_DRAWS).set_value(1)
    at.button(key="run_faithfulness").click().run()
    assert_serving(at)
    assert "Stale" not in warnings(at)
    at.slider(key=session.THRESHOLD).set_value(0.05).run()
    assert "Stale" in warnings(at) and "τ 0.040 → 0.050" in warnings(at)
    at.radio(key=session.ABLATION_MODE).set_value("mean").run()
    assert "mode zero → mean" in warnings(at)
    at.button(key="rerun_faithfulness").click().run()
    assert_serving(at)
    assert "Stale" not in warnings(at)
    key: FaithfulnessKey = at.session_state[session.SHOWN_FAITHFULNESS]
    assert (key.threshold, key.mode) == (0.05, "mean")
    assert any("τ = 0.050, renormalized, mean ablation" in c.value for c in at.caption)


def test_an_ablation_from_other_components_is_marked_stale() -> None:
    at = start(CONTRAST)
    at.multiselect(key=session.ABLATE_HEADS).set_value(["1.0"])
    at.button(key="run_ablation").click().run()
    assert "Stale" not in warnings(at)
    at.slider(key=session.THRESHOLD).set_value(0.1).run()  # the diff follows τ: not stale
    assert "Stale" not in warnings(at)
    at.multiselect(key=session.ABLATE_HEADS).set_value(["1.0", "2.3"]).run()
    assert "ablation zero: heads 1.0 → zero: heads 1.0, 2.3" in warnings(at)
    at.button(key="rerun_ablation").click().run()
    assert_serving(at)
    assert "Stale" not in warnings(at)
    assert any("Ablated (zero): heads 1.0, 2.3" in c.value for c in at.caption)
