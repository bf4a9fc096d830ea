"""What the app computes with SAEs, in bounded process-wide caches: a residual node's latents
(:func:`llm_flow.analyses.latents.latents`) by :class:`LatentsKey` (the trace, the node, the SAE
and the sidebar's target and distractor), an attention edge's split over its source's latents
(:func:`llm_flow.analyses.edge_latents.edge_latents`), and a latent's top corpus examples from
the newest index that covers its SAE. The SAEs themselves are :mod:`app.saes`'s."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from app.bounded import BoundedCache
from app.cache import CachedTrace, TraceKey
from app.saes import SaeRef, get_sae
from llm_flow.analyses.corpus_index import CorpusIndex, IndexProgress
from llm_flow.analyses.edge_latents import EdgeLatents, edge_latents
from llm_flow.analyses.latents import Latents, latents
from llm_flow.analyses.top_examples import UnitReport, latent_report
from llm_flow.io.index_store import build_index, find_latent_index, model_key
from llm_flow.models.base import TransparentLlm

MAX_LATENTS = 32  # a table of top latents: small
MAX_INDEXES = 2  # a corpus index of 16k latents holds their top-k windows: a few MB each
MAX_REPORTS = 64
TOP_LATENTS = 20


@dataclass(frozen=True)
class LatentsKey:
    trace: TraceKey
    node: str
    sae: SaeRef
    contrast: tuple[str, str] | None  # target, distractor (already checked)


# (model, corpus or None for the shipped one, SAE)
IndexKey = tuple[str, str | None, SaeRef]


class Store:
    """The caches of this module, shared by every browser session."""

    def __init__(self) -> None:
        self.latents: BoundedCache[LatentsKey, Latents] = BoundedCache(MAX_LATENTS)
        self.edges: BoundedCache[tuple[TraceKey, str, SaeRef], EdgeLatents] = BoundedCache(
            MAX_LATENTS
        )
        self.indexes: BoundedCache[IndexKey, tuple[CorpusIndex, int]] = BoundedCache(MAX_INDEXES)
        self.reports: BoundedCache[tuple[IndexKey, int], UnitReport] = BoundedCache(MAX_REPORTS)


@st.cache_resource(show_spinner=False)
def store() -> Store:
    return Store()


def get_latents(key: LatentsKey, cached: CachedTrace) -> Latents:
    """The node's :data:`TOP_LATENTS` latents, ``b_dec`` and error (``SaeError`` when the SAE
    cannot be read or does not fit the model)."""
    target, distractor = key.contrast or (None, None)
    return store().latents.get(
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


def get_edge_latents(cached: CachedTrace, edge: str, sae: SaeRef) -> EdgeLatents:
    """Attention ``edge``'s part split over the latents of ``sae`` on its source, the
    :data:`TOP_LATENTS` largest listed (``SaeError`` when the SAE does not fit)."""
    return store().edges.get(
        (cached.key, edge, sae),
        lambda: edge_latents(cached.trace, edge, get_sae(sae), top=TOP_LATENTS),
    )


def _index_key(llm: TransparentLlm, corpus: Path | None, sae: SaeRef) -> IndexKey:
    return model_key(llm), None if corpus is None else str(corpus), sae


def latent_examples(
    llm: TransparentLlm, corpus: Path | None, sae: SaeRef, latent: int
) -> UnitReport:
    """Latent ``latent``'s top examples, histogram and summary from the newest index of ``llm``
    over ``corpus`` (None: the shipped one) that covers ``sae``'s latents, loaded once;
    :class:`IndexNotFoundError` (not cached) while there is none."""
    where = _index_key(llm, corpus, sae)
    index, slot = store().indexes.get(where, lambda: find_latent_index(llm, corpus, get_sae(sae)))
    return store().reports.get((where, latent), lambda: latent_report(llm, index, slot, latent))


def build_latent_index(
    llm: TransparentLlm,
    corpus: Path | None,
    sae: SaeRef,
    max_tokens: int | None,
    progress: IndexProgress,
) -> None:
    """Index the latents of ``sae`` over ``corpus`` (saved in the cache dir, where
    :func:`latent_examples` finds it next)."""
    build_index(llm, corpus, max_tokens=max_tokens, progress=progress, saes=[get_sae(sae)])
