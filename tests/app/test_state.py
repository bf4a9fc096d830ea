"""Tests for app/state.py's process-wide cache: bounded, and one computation per key even when
several sessions (threads) ask at once."""

from __future__ import annotations

import threading
import time

import pytest

from app.state import BoundedCache


def test_lru_bound() -> None:
    cache: BoundedCache[str, int] = BoundedCache(max_entries=2)
    assert cache.get("a", lambda: 1) == 1
    assert cache.get("b", lambda: 2) == 2
    assert cache.get("a", lambda: 99) == 1  # hit; "a" is now the most recent
    assert cache.get("c", lambda: 3) == 3  # evicts "b"
    assert len(cache) == 2
    assert cache.peek("b") is None and cache.peek("a") == 1
    assert cache.computed == 3


def test_concurrent_requests_compute_once() -> None:
    cache: BoundedCache[str, object] = BoundedCache(max_entries=4)
    calls: list[int] = []
    results: list[object] = []

    def slow() -> object:
        calls.append(1)
        time.sleep(0.2)
        return object()

    threads = [
        threading.Thread(target=lambda: results.append(cache.get("model", slow))) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 6 and all(r is results[0] for r in results)


def test_failures_are_not_cached() -> None:
    cache: BoundedCache[str, int] = BoundedCache(max_entries=2)

    def fail() -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get("k", fail)
    assert cache.get("k", lambda: 5) == 5
    assert cache.computed == 1
