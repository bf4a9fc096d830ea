"""The residual-node panel's SAE latents (:func:`llm_flow.analyses.latents.latents`), in one
bounded process-wide cache by :class:`LatentsKey`: the trace, the node, the SAE and the sidebar's
target and distractor. The SAEs themselves are :mod:`app.saes`'s."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from app.bounded import BoundedCache
from app.cache import CachedTrace, TraceKey
from app.saes import SaeRef, get_sae
from llm_flow.analyses.latents import Latents, latents

MAX_LATENTS = 32  # a table of top latents: small
TOP_LATENTS = 20


@dataclass(frozen=True)
class LatentsKey:
    trace: TraceKey
    node: str
    sae: SaeRef
    contrast: tuple[str, str] | None  # target, distractor (already checked)


@st.cache_resource(show_spinner=False)
def store() -> BoundedCache[LatentsKey, Latents]:
    return BoundedCache(MAX_LATENTS)


def get_latents(key: LatentsKey, cached: CachedTrace) -> Latents:
    """The node's :data:`TOP_LATENTS` latents, ``b_dec`` and error (``SaeError`` when the SAE
    cannot be read or does not fit the model)."""
    target, distractor = key.contrast or (None, None)
    return store().get(
        key,
        lambda: latents(
            cached.trace,
            key.node,
            get_sae(key.sae),
            top=TOP_LATENTS,
            target=target,
            distractor=distractor,
        ),
    )
