"""Tests for app/views/examples.py: the "Top examples" tab of the neuron, head and expert panels
(a corpus index built from the panel, its examples, histogram and summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from app import cache, session
from app.views.examples import SHIPPED, example_rows
from llm_flow.analyses.top_examples import Example, UnitReport
from llm_flow.analyses.top_examples import unit_report as make_unit_report
from tests.app.apptest import assert_serving, graph_ids, start
from tests.tiny import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("offline")


def test_a_row_marks_the_activating_token_in_its_context() -> None:
    tok = tiny_tokenizer()
    ids = tuple(tok.encode("w1 w2 w3 w4 w5 w6 w7"))
    rows = example_rows(tok.decode, [Example(ids, 2, "w3", "", 1.5)])
    assert list(rows["activation"]) == [1.5]
    (context,) = rows["context"]
    assert "⟦" in context and context.index("⟦") < context.index("⟧")
    marked = context[context.index("⟦") + 1 : context.index("⟧")]
    assert marked.strip() == tok.decode([ids[2]]).strip()


def _examples_table(at: AppTest) -> list[float] | None:
    for frame in at.dataframe:
        if list(frame.value.columns) == ["activation", "context"]:
            return list(frame.value["activation"])
    return None


def test_a_neuron_panel_builds_the_index_of_its_layer_and_shows_its_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    made: list[UnitReport] = []

    def recorded(*args: Any) -> UnitReport:
        made.append(make_unit_report(*args))
        return made[-1]

    monkeypatch.setattr(cache, "make_unit_report", recorded)
    at = start({"threshold": "0"})
    block = next(i for i in graph_ids(at) if i.startswith("M0_"))
    at.session_state[session.SELECTION] = block
    at.run()
    assert_serving(at)
    neuron = at.selectbox(key=f"neuron|{block}").value
    key = f"{block}|{neuron}"
    corpus = at.selectbox(key=f"corpus|{key}")
    assert corpus.options[0] == SHIPPED and "more.txt" in corpus.options
    corpus.set_value("more.txt").run()
    assert any("no corpus index" in i.value for i in at.info)  # none yet: offer to build one
    assert _examples_table(at) is None
    at.button(key=f"build_index|{key}").click().run()
    assert_serving(at)
    shown = _examples_table(at)
    assert shown, "no examples after building the index"
    assert shown == sorted(shown, reverse=True)  # largest first
    (report,) = made
    assert (report.kind, report.layer, report.unit) == ("neuron", 0, neuron)
    assert shown == pytest.approx([e.activation for e in report.examples[: len(shown)]])
    assert any("automatic summary" in m.value for m in at.markdown)
    assert any(
        '"type":"log"' in c.proto.spec.replace(" ", "") for c in at.get("plotly_chart")
    )  # the histogram
