"""Tests for app/cache.py: the bounded caches (one computation per key even when several
sessions ask at once), and that the app's slider moves and reruns compute nothing again."""

from __future__ import annotations

import threading
import time

import pytest

from app import cache, session
from app.bounded import BoundedCache
from tests.app.apptest import assert_serving, route_caption, start
from tests.app.conftest import PROMPTS


def test_lru_bound() -> None:
    lru: BoundedCache[str, int] = BoundedCache(max_entries=2)
    assert lru.get("a", lambda: 1) == 1
    assert lru.get("b", lambda: 2) == 2
    assert lru.get("a", lambda: 99) == 1  # hit; "a" is now the most recent
    assert lru.get("c", lambda: 3) == 3  # evicts "b"
    assert len(lru) == 2
    assert lru.peek("b") is None and lru.peek("a") == 1
    assert lru.computed == 3


def test_concurrent_requests_compute_once() -> None:
    lru: BoundedCache[str, object] = BoundedCache(max_entries=4)
    calls: list[int] = []
    results: list[object] = []

    def slow() -> object:
        calls.append(1)
        time.sleep(0.2)
        return object()

    threads = [
        threading.Thread(target=lambda: results.append(lru.get("model", slow))) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 6 and all(r is results[0] for r in results)


def test_failures_are_not_cached() -> None:
    lru: BoundedCache[str, int] = BoundedCache(max_entries=2)

    def fail() -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        lru.get("k", fail)
    assert lru.get("k", lambda: 5) == 5
    assert lru.computed == 1


@pytest.mark.usefixtures("offline")
def test_slider_toggle_and_position_rerun_routes_only() -> None:
    at = start()
    assert_serving(at)
    assert at.selectbox(key=session.MODEL).value == "tiny"
    assert at.selectbox(key=session.PROMPT).value == PROMPTS[0]
    assert at.slider(key=session.THRESHOLD).value == pytest.approx(0.04)
    traces, models = cache.store().traces.computed, cache.store().models.computed
    before = route_caption(at)

    at.slider(key=session.THRESHOLD).set_value(0.15).run()
    assert_serving(at)
    assert route_caption(at) != before and "τ = 0.150" in (route_caption(at) or "")
    at.toggle(key=session.RENORMALIZE).set_value(False).run()
    at.selectbox(key=session.POSITION).set_value(1).run()
    assert_serving(at)
    at.slider(key=session.THRESHOLD).set_value(0.0).run()
    assert_serving(at)
    # Slider, toggle and position re-ran routes and drawing only.
    assert cache.store().traces.computed == traces
    assert cache.store().models.computed == models

    at.text_area(key=session.NEW_PROMPT).input("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11")
    at.button(key="add_prompt").click().run()
    assert_serving(at)
    assert cache.store().traces.computed == traces + 1  # a new prompt runs the model once
    assert at.selectbox(key=session.POSITION).value == 11  # a new prompt starts at its end
    at.selectbox(key=session.PROMPT).set_value(PROMPTS[0]).run()
    assert_serving(at)
    assert cache.store().traces.computed == traces + 1  # the earlier prompt is cached


@pytest.mark.usefixtures("offline")
def test_sessions_share_the_model_but_not_results() -> None:
    first = start({"prompt": PROMPTS[0]})
    models = cache.store().models.computed
    second = start({"prompt": PROMPTS[2]})
    assert_serving(first)
    assert_serving(second)
    assert cache.store().models.computed == models
    first.run()
    assert first.selectbox(key=session.PROMPT).value == PROMPTS[0]
    assert (
        first.selectbox(key=session.POSITION).options
        != second.selectbox(key=session.POSITION).options
    )


def test_a_trace_without_patterns_gets_one_layer_recomputed_once() -> None:
    from llm_flow.config import ModelSpec
    from llm_flow.engine.trace import trace
    from tests.tiny import prompt, tiny_llm

    llm = tiny_llm("llama-gqa")
    text = prompt(6)
    kept, dropped = trace(llm, text), trace(llm, text, keep_patterns=False)
    key = cache.TraceKey(cache.ModelKey(ModelSpec("tiny", "hub"), "cpu", "float32"), text)
    cached = cache.CachedTrace(key, dropped, 0.0)
    before = cache.store().layer_runs.computed
    layer = cache.layer_run(cached, 1)
    assert layer.pattern is not None and layer.pattern_rows is None
    assert layer.pattern.equal(kept.run.layers[1].pattern)  # type: ignore[arg-type]
    assert cache.layer_run(cached, 1) is layer  # cached: no second pass
    assert cache.store().layer_runs.computed == before + 1
    other = cache.TraceKey(cache.ModelKey(ModelSpec("tiny-kept", "hub"), "cpu", "float32"), text)
    assert cache.head_map(cache.CachedTrace(other, kept, 0.0), 1).equal(cache.head_map(cached, 1))
