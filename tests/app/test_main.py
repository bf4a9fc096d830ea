"""Tests for app/main.py: the page as a whole, with errors a user can cause (a broken config, an
unknown or broken model) shown as ``st.error`` while the app keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import session
from tests.app.apptest import assert_serving, errors, start

pytestmark = pytest.mark.usefixtures("offline")


def test_unknown_and_broken_models_show_an_error_and_the_app_keeps_serving() -> None:
    at = start({"model": "no-such-model"})  # not configured: tried as a hub id, offline
    assert at.selectbox(key=session.MODEL).value == session.CUSTOM_CHOICE
    assert "no-such-model" in errors(at) and "packaged model" in errors(at)
    assert not at.exception

    at.text_input(key=session.CUSTOM_MODEL).input("/no/such/weights").run()
    assert "no such file or folder" in errors(at)
    at.text_input(key=session.CUSTOM_MODEL).input("bad name!").run()
    assert "hub id" in errors(at)

    at.selectbox(key=session.MODEL).set_value("tiny").run()
    assert_serving(at)


def test_an_unsupported_design_is_one_error_line_and_the_app_keeps_serving() -> None:
    at = start({"model": "tiny-mamba"})
    assert not at.exception
    assert "MambaForCausalLM is not supported" in errors(at)
    assert "state-space" in errors(at) and "supported families" in errors(at)
    at.selectbox(key=session.MODEL).set_value("tiny").run()
    assert_serving(at)


def test_a_broken_config_file_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": {"m": {"source": "nowhere"}}}', encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FLOW_CONFIG", str(broken))
        at = start()
    assert "unknown source" in errors(at) and "Fix the config file" in errors(at)
    assert not at.exception
