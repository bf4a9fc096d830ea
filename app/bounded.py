"""A thread-safe, bounded LRU cache that computes each missing key once: what every cache of
the app (:mod:`app.cache`) is built on. Streamlit's own caches hash their arguments; these take
explicit keys, so every argument that changes a result is visibly part of one."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A thread-safe LRU cache that computes each missing key once, even under concurrency.

    ``computed`` counts computations (tests use it to prove a slider move ran no model).
    A computation that raises caches nothing, so the next request retries.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.computed = 0
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[K, threading.Lock] = {}

    def peek(self, key: K) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def get(self, key: K, compute: Callable[[], V]) -> V:
        found = self.peek(key)
        if found is not None:
            return found
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # a second session asking for the same key waits for the first
            found = self.peek(key)
            if found is not None:
                return found
            try:
                value = compute()
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            with self._lock:
                self._items[key] = value
                self.computed += 1
                while len(self._items) > self.max_entries:
                    self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)
