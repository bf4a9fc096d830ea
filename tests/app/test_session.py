"""Tests for app/session.py: the view starts from the URL, is written back to it, and stale or
forged links fall back with a warning."""

from __future__ import annotations

import pytest

from app import session
from tests.app.apptest import assert_serving, graph_ids, start, subheaders
from tests.app.conftest import PROMPTS

pytestmark = pytest.mark.usefixtures("offline")


def test_the_url_follows_the_view() -> None:
    at = start()
    assert_serving(at)
    assert dict(at.query_params) == {
        "model": "tiny",
        "prompt": PROMPTS[0],
        "position": str(len(PROMPTS[0].split())),  # the last token (BOS first)
        "threshold": "0.04",
    }
    at.slider(key=session.THRESHOLD).set_value(0.15).run()
    assert at.query_params["threshold"] == "0.15"
    at.toggle(key=session.RENORMALIZE).set_value(False).run()
    assert at.query_params["renormalize"] == "0"
    at.selectbox(key=session.POSITION).set_value(1).run()
    assert_serving(at)
    assert at.query_params["position"] == "1"


def test_a_position_click_redraws_the_route() -> None:
    at = start()
    assert any(s.startswith("pos:") for s in graph_ids(at))  # the output markers
    at.session_state[session.POSITION] = 2  # what on_graph_select does for a "pos:2" click
    at.run()
    assert_serving(at)
    assert at.selectbox(key=session.POSITION).value == 2
    assert at.query_params["position"] == "2"


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
    assert at.selectbox(key=session.PROMPT).value == PROMPTS[1]
    assert at.selectbox(key=session.POSITION).value == 3
    assert at.slider(key=session.THRESHOLD).value == pytest.approx(0.1)
    assert subheaders(at) == ["FFN block M1_2"]
    assert dict(at.query_params) == query


def test_a_link_to_an_absent_device_says_so_and_uses_the_cpu() -> None:
    at = start({"device": "cuda", "dtype": "bfloat16"})  # no GPU on this machine
    assert_serving(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "device 'cuda' is not available here" in warnings and "'cpu'" in warnings
    assert at.selectbox(key=session.DEVICE).value == "cpu"
    assert at.selectbox(key=session.DTYPE).value == "bfloat16"  # the rest of the link holds
    assert "device" not in at.query_params and at.query_params["dtype"] == "bfloat16"
    at.run()
    assert not at.warning  # said once


def test_a_link_to_a_present_device_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # pretend a GPU is present
    at = start({"device": "cuda", "dtype": "float16"})
    assert not at.warning
    assert at.selectbox(key=session.DEVICE).value == "cuda"
    assert at.selectbox(key=session.DTYPE).value == "float16"
    assert at.error and not at.exception  # the fake GPU cannot load: an error, no traceback


def test_a_link_to_an_unknown_precision_says_so() -> None:
    at = start({"dtype": "float8"})
    assert_serving(at)
    assert any("precision 'float8' is not one of" in w.value for w in at.warning)
    assert at.selectbox(key=session.DTYPE).value == "float32"


def test_bad_links_warn_and_fall_back() -> None:
    at = start({"selection": "A99_0", "threshold": "7", "position": "x"})
    assert_serving(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "not part of this graph" in warnings
    assert "threshold" in warnings and "position" in warnings
    assert at.slider(key=session.THRESHOLD).value == pytest.approx(0.04)
    assert "selection" not in at.query_params
