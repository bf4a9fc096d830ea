"""Tests for app/views/why.py: the heads panel's "Why this source?" tab (QK attribution)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from app import cache, session
from app.views.panels import ALL
from app.views.why import _VIEWS, component_selection
from llm_flow.analyses.attend import Attend, attend
from llm_flow.engine.nodes import parse_attention_edge
from tests.app.apptest import assert_serving, graph_ids, start

pytestmark = pytest.mark.usefixtures("offline")


def test_a_component_selects_the_node_or_block_it_was_written_into() -> None:
    assert component_selection("X0_5") == ("X0_5", None)
    assert component_selection("A3_5.h2") == ("A3_5", 2)  # a head writes into A3_5
    assert component_selection("M4_5") == ("M4_5", None)
    assert component_selection("M4_5.e7") == ("M4_5", 7)  # an expert: its block, expert first
    for nothing in ("bias", "position/softcap", "M4_5.shared", "A3_5.h"):
        assert component_selection(nothing) is None


def _score_charts(at: AppTest) -> list[dict]:  # type: ignore[type-arg]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return [s for s in specs if s["data"] and s["data"][0].get("orientation") == "h"]


def test_the_tab_splits_the_selected_heads_score_into_clickable_bars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[Attend] = []

    def recorded(*args: Any) -> Attend:
        made.append(attend(*args))
        return made[-1]

    monkeypatch.setattr(cache, "attend_edge", recorded)
    at = start({"threshold": "0"})
    edge = next(i for i in graph_ids(at) if "->" in i and not i.startswith("X0_"))
    layer, t, s = parse_attention_edge(edge)  # type: ignore[misc]
    at.session_state[session.SELECTION] = edge
    at.run()
    assert_serving(at)
    head = at.selectbox(key=f"head|{edge}").value
    assert head != ALL
    (result,) = made
    assert (result.layer, result.head, result.query, result.source) == (layer, head, t, s)
    summary = " | ".join(m.value for m in at.markdown)
    assert f"**{result.direct.score:.3f}**" in summary and f"{result.attention:.3f}" in summary
    query_side, key_side = _score_charts(at)
    for chart, terms in (
        (query_side, result.direct.query_terms),
        (key_side, result.direct.key_terms),
    ):
        bars = chart["data"][0]
        shown = terms[: len(bars["x"])]
        assert list(bars["x"]) == pytest.approx([term.value for term in shown][::-1])
        # each bar a click can select carries its part's name; bias selects nothing
        for term, target in zip(shown[::-1], bars["customdata"], strict=True):
            assert target == (term.component if component_selection(term.component) else "")
    # The contrast view: s rather than the other sources.
    if result.contrast is not None:
        at.radio(key=f"why_view|{edge}|{head}").set_value(_VIEWS[1]).run()
        assert_serving(at)
        summary = " | ".join(m.value for m in at.markdown)
        assert f"**{result.contrast.score:.3f}**" in summary

    # "All heads" has no single score to split.
    at.selectbox(key=f"head|{edge}").set_value(ALL).run()
    assert any("Choose a head above" in i.value for i in at.info)
