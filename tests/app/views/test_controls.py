"""Tests for app/views/controls.py: the sidebar's model, device, precision and prompt controls."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import session
from tests.app.apptest import assert_serving, errors, route_caption, start
from tests.app.conftest import FILE_PROMPTS, PROMPT_LIMIT, PROMPTS

pytestmark = pytest.mark.usefixtures("offline")


def test_bad_prompts_show_an_error_and_the_app_keeps_serving() -> None:
    at = start()
    at.text_area(key=session.NEW_PROMPT).input("   ")
    at.button(key="add_prompt").click().run()
    assert "empty" in errors(at)
    assert route_caption(at)  # the previous graph is still there

    # An over-long paste is refused in the same words as an over-long link
    # (test_a_too_long_prompt_in_the_url_is_refused), not cut or dropped by the browser.
    assert not at.text_area(key=session.NEW_PROMPT).max_chars  # 0: no limit in the browser
    at.text_area(key=session.NEW_PROMPT).input("w2 " * PROMPT_LIMIT)
    at.button(key="add_prompt").click().run()
    assert "characters" in errors(at) and "shorten it" in errors(at)
    assert route_caption(at)  # and the graph stays

    at.text_area(key=session.NEW_PROMPT).input("w5 w6 w7")
    at.button(key="add_prompt").click().run()
    assert_serving(at)
    assert at.selectbox(key=session.PROMPT).value == "w5 w6 w7"


def test_a_too_long_prompt_in_the_url_is_refused() -> None:
    at = start({"prompt": "w2 " * PROMPT_LIMIT})
    assert "characters" in errors(at) and "shorten it" in errors(at)
    assert not at.exception and route_caption(at) is None
    at.selectbox(key=session.PROMPT).set_value(PROMPTS[0]).run()
    assert_serving(at)


def test_a_custom_local_model_really_loads(model_dirs: dict[str, Path]) -> None:
    at = start()
    at.selectbox(key=session.MODEL).set_value(session.CUSTOM_CHOICE).run()
    assert any("Type a hub id or a local path" in i.value for i in at.info)
    path = str(model_dirs["neox-parallel"])
    at.text_input(key=session.CUSTOM_MODEL).input(path).run()
    assert_serving(at)
    assert at.query_params["model"] == path
    info = at.sidebar.dataframe[0].value
    assert "GPTNeoXForCausalLM" in set(info["value"])


def test_prompt_files_load_from_the_prompts_folder_only() -> None:
    at = start()
    at.selectbox(key=session.PROMPT_FILE).set_value("more.txt")
    at.button(key="load_prompts").click().run()
    assert_serving(at)
    prompt = at.selectbox(key=session.PROMPT)
    assert prompt.value == FILE_PROMPTS[0]
    assert set(FILE_PROMPTS) <= set(prompt.options)
    assert at.selectbox(key=session.PROMPT_FILE).options == ["more.txt", "preloaded.jsonl"]


def test_demo_mode_hides_custom_models_and_file_loading(demo_config_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FLOW_CONFIG", str(demo_config_path))
        at = start({"model": "/etc"})
    assert_serving(at)
    assert session.CUSTOM_CHOICE not in at.selectbox(key=session.MODEL).options
    assert at.selectbox(key=session.MODEL).value == "tiny"
    assert any("not available here" in w.value for w in at.warning)
    assert not [b for b in at.button if b.key == "load_prompts"]


def _model_info(at: AppTest) -> dict[str, str]:
    info = at.sidebar.dataframe[0].value
    return dict(zip(info["property"], info["value"], strict=True))


def test_cuda_is_offered_when_a_gpu_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    at = start()
    assert at.selectbox(key=session.DEVICE).options == ["cpu"]  # no GPU on this machine
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # pretend one is present
    at.run()
    assert at.selectbox(key=session.DEVICE).options == ["cpu", "cuda"]
    at.selectbox(key=session.DEVICE).set_value("cuda").run()
    assert at.error and not at.exception  # the fake GPU cannot load: an error, no traceback
    at.selectbox(key=session.DEVICE).set_value("cpu").run()
    assert_serving(at)


def test_half_precision_runs_on_the_cpu_as_in_the_cli() -> None:
    at = start()
    assert at.selectbox(key=session.DEVICE).value == "cpu"
    assert at.selectbox(key=session.DTYPE).options == ["float32", "float16", "bfloat16"]
    assert _model_info(at)["dtype"] == "float32"
    for dtype in ("bfloat16", "float16"):
        at.selectbox(key=session.DTYPE).set_value(dtype).run()
        assert_serving(at)
        assert _model_info(at)["dtype"] == dtype  # the model really was reloaded in it
        assert at.query_params["dtype"] == dtype
    at.selectbox(key=session.DTYPE).set_value("float32").run()
    assert "dtype" not in at.query_params  # the default stays out of the link
