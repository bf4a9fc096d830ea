"""The model and the trace of the view, from the cache or computed while the page shows what is
going on (a status box while a model loads, a progress bar over the layers of a trace)."""

from __future__ import annotations

import streamlit as st

from app import cache
from app.cache import CachedTrace, LoadedModel, ModelKey, TraceKey


def model(key: ModelKey) -> LoadedModel:
    cached = cache.cached_model(key)
    if cached is not None:
        return cached
    slot = st.empty()  # the status box goes away once the model is there
    with slot.status(f"Loading {key.spec.name} on {key.device} ({key.dtype})…") as status:
        loaded = cache.get_model(key, progress=status.write)
    slot.empty()
    st.toast(f"Loaded {key.spec.name} in {loaded.load_seconds:.1f} s")
    return loaded


def trace(key: TraceKey, loaded: LoadedModel) -> CachedTrace:
    cached = cache.cached_trace(key)
    if cached is not None:
        return cached
    slot = st.empty()
    with slot.status("Running the model and computing contributions…"):
        bar = st.progress(0.0)

        def on_layer(done: int, total: int) -> None:
            bar.progress(done / total, text=f"layer {done} of {total}")

        result = cache.get_trace(key, loaded, on_layer=on_layer)
    slot.empty()
    return result
