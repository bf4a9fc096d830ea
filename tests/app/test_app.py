"""Tests of the whole app with Streamlit's AppTest on tiny local models (no browser).

Clicks on the plotly graph cannot be simulated here; they end up as a selection string in
session state (``app.state.SELECTION``), which these tests set directly. The click itself is
covered by tests/app/test_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from app import state
from app.panels import ALL
from tests.app.conftest import FILE_PROMPTS, PROMPT_LIMIT, PROMPTS

APP = Path(__file__).resolve().parents[2] / "app" / "main.py"
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, config_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLM_FLOW_CONFIG", str(config_path))


def start(query: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if query:
        at.query_params.update(query)
    return at.run()


def assert_serving(at: AppTest) -> None:
    """No exception, no error, and a graph on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert route_caption(at)


def route_caption(at: AppTest) -> str | None:
    return next((c.value for c in at.caption if c.value.startswith("Route:")), None)


def errors(at: AppTest) -> str:
    """The error texts as a user reads them (Markdown escapes removed)."""
    return re.sub(r"\\(.)", r"\1", " | ".join(e.value for e in at.error))


def graph_ids(at: AppTest) -> list[str]:
    """Everything the graph lets a user click (the figure's customdata strings)."""
    charts = [c for c in at.get("plotly_chart") if "customdata" in c.proto.spec]
    spec: dict[str, Any] = json.loads(charts[0].proto.spec)
    ids: list[str] = []
    for trace in spec["data"]:
        data = trace.get("customdata") or []
        ids += [d for d in data if isinstance(d, str)]
    return ids


def subheaders(at: AppTest) -> list[str]:
    return [s.value for s in at.subheader]


def test_loads_runs_and_reprunes_without_rerunning_the_model() -> None:
    at = start()
    assert_serving(at)
    assert at.selectbox(key=state.MODEL).value == "tiny"
    assert at.selectbox(key=state.PROMPT).value == PROMPTS[0]
    assert at.slider(key=state.THRESHOLD).value == pytest.approx(0.04)
    assert at.query_params["model"] == "tiny"
    assert at.query_params["threshold"] == "0.04"
    assert any(s.startswith("pos:") for s in graph_ids(at))
    traces, models = state.store().traces.computed, state.store().models.computed
    before = route_caption(at)

    at.slider(key=state.THRESHOLD).set_value(0.15).run()
    assert_serving(at)
    assert route_caption(at) != before and "τ = 0.150" in (route_caption(at) or "")
    assert at.query_params["threshold"] == "0.15"
    at.toggle(key=state.RENORMALIZE).set_value(False).run()
    at.selectbox(key=state.POSITION).set_value(1).run()
    assert_serving(at)
    assert at.query_params["position"] == "1"
    at.slider(key=state.THRESHOLD).set_value(0.0).run()
    assert_serving(at)
    # Slider, toggle and position re-ran routes and drawing only.
    assert state.store().traces.computed == traces
    assert state.store().models.computed == models

    at.text_area(key=state.NEW_PROMPT).input("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11")
    at.button(key="add_prompt").click().run()
    assert_serving(at)
    assert state.store().traces.computed == traces + 1  # a new prompt runs the model once
    assert at.selectbox(key=state.POSITION).value == 11  # a new prompt starts at its end
    at.selectbox(key=state.PROMPT).set_value(PROMPTS[0]).run()
    assert_serving(at)
    assert state.store().traces.computed == traces + 1  # the earlier prompt is cached


def test_selecting_an_edge_a_block_and_a_node_fills_the_panel() -> None:
    at = start({"threshold": "0"})  # the whole graph: every kind of element is on it
    assert_serving(at)
    assert any("Click the graph" in i.value for i in at.info)
    ids = graph_ids(at)
    edge = next(i for i in ids if "->" in i)
    block = next(i for i in ids if i.startswith("M"))
    node = next(i for i in ids if i.startswith("I"))

    at.session_state[state.SELECTION] = edge
    at.run()
    assert_serving(at)
    assert subheaders(at)[-1].startswith("Attention ")
    head = at.selectbox(key=f"head|{edge}")
    assert head.value != ALL  # the strongest head is preselected
    assert any("is not the token-level edge weight" in c.value for c in at.caption)
    assert len(at.dataframe) >= 2  # promoted and suppressed
    assert at.query_params["selection"] == edge
    head.set_value(ALL).run()
    assert_serving(at)

    at.session_state[state.SELECTION] = block
    at.run()
    assert_serving(at)
    assert subheaders(at)[-1] == f"FFN block {block}"
    neuron = at.selectbox(key=f"neuron|{block}")
    assert neuron.value != ALL
    neuron.set_value(ALL).run()
    assert_serving(at)

    at.session_state[state.SELECTION] = node
    at.run()
    assert_serving(at)
    assert subheaders(at)[-1] == f"Residual {node}"
    assert "rank" in at.dataframe[0].value.columns
    at.toggle(key=state.NORMALIZE_LENS).set_value(False).run()
    assert_serving(at)
    layer, t = node[1:].split("_")
    at.button(key="go_previous").click().run()
    assert subheaders(at)[-1] == f"Residual A{layer}_{t}"
    at.button(key="clear_selection").click().run()
    assert_serving(at)
    assert not subheaders(at)
    assert "selection" not in at.query_params


def test_a_position_click_redraws_the_route() -> None:
    at = start()
    at.session_state[state.POSITION] = 2  # what on_graph_select does for a "pos:2" click
    at.run()
    assert_serving(at)
    assert at.selectbox(key=state.POSITION).value == 2
    assert at.query_params["position"] == "2"


def test_panels_work_for_parallel_blocks() -> None:
    at = start({"model": "tiny-parallel", "threshold": "0"})
    assert_serving(at)
    ids = graph_ids(at)
    for chosen in (
        next(i for i in ids if "->" in i),
        next(i for i in ids if i.startswith("M")),
        next(i for i in ids if i.startswith("A")),
        "X0_0",
    ):
        at.session_state[state.SELECTION] = chosen
        at.run()
        assert_serving(at)
        assert subheaders(at)


def test_the_url_reproduces_the_view() -> None:
    query = {
        "model": "tiny",
        "prompt": PROMPTS[1],
        "position": "3",
        "threshold": "0.1",
        "selection": "M1_2",
    }
    at = start(query)
    assert_serving(at)
    assert at.selectbox(key=state.PROMPT).value == PROMPTS[1]
    assert at.selectbox(key=state.POSITION).value == 3
    assert at.slider(key=state.THRESHOLD).value == pytest.approx(0.1)
    assert subheaders(at) == ["FFN block M1_2"]
    assert dict(at.query_params) == query


def test_bad_links_warn_and_fall_back() -> None:
    at = start({"selection": "A99_0", "threshold": "7", "position": "x"})
    assert_serving(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "not part of this graph" in warnings
    assert "threshold" in warnings and "position" in warnings
    assert at.slider(key=state.THRESHOLD).value == pytest.approx(0.04)


def test_bad_prompts_show_an_error_and_the_app_keeps_serving() -> None:
    at = start()
    at.text_area(key=state.NEW_PROMPT).input("   ")
    at.button(key="add_prompt").click().run()
    assert "empty" in errors(at)
    assert route_caption(at)  # the previous graph is still there

    # The browser cannot type past the limit; a longer prompt can only come from a link
    # (test_a_too_long_prompt_in_the_url_is_refused).
    assert at.text_area(key=state.NEW_PROMPT).max_chars == PROMPT_LIMIT

    at.text_area(key=state.NEW_PROMPT).input("w5 w6 w7")
    at.button(key="add_prompt").click().run()
    assert_serving(at)
    assert at.selectbox(key=state.PROMPT).value == "w5 w6 w7"


def test_a_too_long_prompt_in_the_url_is_refused() -> None:
    at = start({"prompt": "w2 " * PROMPT_LIMIT})
    assert "characters" in errors(at) and "shorten it" in errors(at)
    assert not at.exception and route_caption(at) is None
    at.selectbox(key=state.PROMPT).set_value(PROMPTS[0]).run()
    assert_serving(at)


def test_unknown_and_broken_models_show_an_error_and_the_app_keeps_serving() -> None:
    at = start({"model": "no-such-model"})  # not configured: tried as a hub id, offline
    assert at.selectbox(key=state.MODEL).value == state.CUSTOM_CHOICE
    assert "no-such-model" in errors(at) and "packaged model" in errors(at)
    assert not at.exception

    at.text_input(key=state.CUSTOM_MODEL).input("/no/such/weights").run()
    assert "no such file or folder" in errors(at)
    at.text_input(key=state.CUSTOM_MODEL).input("bad name!").run()
    assert "hub id" in errors(at)

    at.selectbox(key=state.MODEL).set_value("tiny").run()
    assert_serving(at)


def test_a_custom_local_model_really_loads(model_dirs: dict[str, Path]) -> None:
    at = start()
    at.selectbox(key=state.MODEL).set_value(state.CUSTOM_CHOICE).run()
    assert any("Type a hub id or a local path" in i.value for i in at.info)
    path = str(model_dirs["neox-parallel"])
    at.text_input(key=state.CUSTOM_MODEL).input(path).run()
    assert_serving(at)
    assert at.query_params["model"] == path
    info = at.sidebar.dataframe[0].value
    assert "GPTNeoXForCausalLM" in set(info["value"])


def test_prompt_files_load_from_the_prompts_folder_only() -> None:
    at = start()
    at.selectbox(key=state.PROMPT_FILE).set_value("more.txt")
    at.button(key="load_prompts").click().run()
    assert_serving(at)
    prompt = at.selectbox(key=state.PROMPT)
    assert prompt.value == FILE_PROMPTS[0]
    assert set(FILE_PROMPTS) <= set(prompt.options)
    assert at.selectbox(key=state.PROMPT_FILE).options == ["more.txt", "preloaded.jsonl"]


def test_demo_mode_hides_custom_models_and_file_loading(demo_config_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FLOW_CONFIG", str(demo_config_path))
        at = start({"model": "/etc"})
    assert_serving(at)
    assert state.CUSTOM_CHOICE not in at.selectbox(key=state.MODEL).options
    assert at.selectbox(key=state.MODEL).value == "tiny"
    assert any("not available here" in w.value for w in at.warning)
    assert not [b for b in at.button if b.key == "load_prompts"]


def test_downloads_are_offered() -> None:
    at = start()
    keys = {b.proto.id for b in at.get("download_button")}
    assert len(keys) >= 3


def test_sessions_share_the_model_but_not_results() -> None:
    first = start({"prompt": PROMPTS[0]})
    models = state.store().models.computed
    second = start({"prompt": PROMPTS[2]})
    assert_serving(first)
    assert_serving(second)
    assert state.store().models.computed == models
    first.run()
    assert first.selectbox(key=state.PROMPT).value == PROMPTS[0]
    assert (
        first.selectbox(key=state.POSITION).options != second.selectbox(key=state.POSITION).options
    )


def test_precision_choices_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    at = start()
    assert at.selectbox(key=state.DEVICE).options == ["cpu"]  # no GPU on this machine
    assert at.selectbox(key=state.DTYPE).options == ["float32"]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # pretend one is present
    at.run()
    assert at.selectbox(key=state.DEVICE).options == ["cpu", "cuda"]
    at.selectbox(key=state.DEVICE).set_value("cuda").run()
    assert at.selectbox(key=state.DTYPE).options == ["float32", "float16", "bfloat16"]
    at.selectbox(key=state.DTYPE).set_value("bfloat16").run()
    assert at.error and not at.exception  # the fake GPU cannot load: an error, no traceback
    at.selectbox(key=state.DEVICE).set_value("cpu").run()
    assert at.selectbox(key=state.DTYPE).value == "float32"  # half precision needs a GPU
    assert_serving(at)


def test_a_broken_config_file_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": {"m": {"source": "nowhere"}}}', encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FLOW_CONFIG", str(broken))
        at = start()
    assert "unknown source" in errors(at) and "Fix the config file" in errors(at)
    assert not at.exception
