"""The explorer's process-wide caches: one :class:`Store` (``st.cache_resource``) shared by every
browser session, holding bounded LRU caches keyed by every argument that changes their result:

- ``models``: loaded models by :class:`ModelKey` (spec, device, dtype);
- ``traces``: the engine's :class:`~llm_flow.engine.trace.Trace` (forward pass, full contribution
  graph, predictions) by :class:`TraceKey` (model key, prompt);
- ``layer_runs``: one layer of a trace with its whole attention pattern, recomputed when the trace
  did not keep it (long prompts), by (trace key, layer);
- ``head_maps``: per-head contribution maps by (trace key, layer);
- ``attends``: QK attributions by (trace key, layer, head, query, source);
- ``corpus_indexes``, ``unit_reports``: saved corpus indexes as loaded, and a unit's top
  examples from one;
- ``contrast_effects``: "why A instead of B?" — the contrast, direct effects and attributions
  (one backward pass) by :class:`ContrastKey` (trace key, position, target, distractor);
  ``contrast_tables``: the route's effect table by (contrast key, threshold, renormalize);
- ``means``: mean activations for mean ablation by :class:`MeansKey` (model key, prompt file,
  its mtime);
- ``ablations``: traced ablations (before/after prediction and the ablated run's graph, so a
  route diff at any τ only re-runs routes) by :class:`AblationKey`, SAE latents included;
- ``faithfulness``: faithfulness reports by :class:`FaithfulnessKey`;
- ``datasets``: dataset-mode tables by :class:`DatasetKey`.

Prompt files' contents are cached by ``st.cache_data`` keyed by (path, mtime).

Moving the threshold slider or a toggle therefore re-runs only ``find_route`` and the drawing.
Traces are immutable, so browser sessions share them without mixing results; nothing holds a
mutable "last run". A loaded model is shared too: TransformerLens adds hooks to the shared
modules during a forward pass, so :class:`~llm_flow.models.BridgeLlm` lets one pass at a time
run on a model (its own lock).

The caches are our own rather than ``st.cache_resource(max_entries=...)`` per function because
loading reports progress into the page (``st.status``), which Streamlit's caches would record and
replay, and because a per-key lock lets two sessions asking for the same model wait for one load.
``progress``/``on_layer``/``on_prompt``/``on_step`` callbacks only report, so they are no part of
a key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import pandas as pd
import streamlit as st
import torch

from app.bounded import BoundedCache
from app.saes import LatentEdit, get_sae
from llm_flow.analyses.ablation import AblationResult, ablate
from llm_flow.analyses.attend import Attend
from llm_flow.analyses.attend import attend as attend_edge
from llm_flow.analyses.attribution import Attributions, attribute
from llm_flow.analyses.contrast import (
    Contrast,
    ContrastAnalysis,
    DirectEffects,
    contrast,
    contrast_ids,
    direct_effects,
    effect_rows,
)
from llm_flow.analyses.corpus_index import CorpusIndex, IndexProgress, Kind
from llm_flow.analyses.dataset import DatasetComparison, compare_prompts, dataset_frequencies
from llm_flow.analyses.faithfulness import FaithfulnessReport, faithfulness
from llm_flow.analyses.interventions import Ablation, MeanActivations, Mode, mean_activations
from llm_flow.analyses.latents import latent_hooks
from llm_flow.analyses.top_examples import UnitReport
from llm_flow.analyses.top_examples import unit_report as make_unit_report
from llm_flow.config import AppConfig, ModelSpec
from llm_flow.engine.graph import layer_head_contributions
from llm_flow.engine.routes import Route
from llm_flow.engine.trace import Trace, trace
from llm_flow.io.index_store import build_index, find_index, model_key
from llm_flow.io.prompts import read_prompt_file
from llm_flow.models import BridgeLlm, load_model
from llm_flow.models.base import LayerRun, TransparentLlm

# Bounds of the process-wide caches. Two models: switching back and forth stays instant while
# a 7B model in bf16 (~14 GB) cannot pile up; traces are small next to a model.
MAX_MODELS = 2
MAX_TRACES = 16
MAX_HEAD_MAPS = 32
MAX_ATTENDS = 32
MAX_CORPUS_INDEXES = 4  # an all-layer index of SmolLM2 holds 46k units' top examples
MAX_UNIT_REPORTS = 64
MAX_LAYER_RUNS = 2  # recomputed [H, T, T] patterns: 0.6 GB each for SmolLM2 at 4096 tokens
# Attributions keep ∂LD/∂z for every head and position ([L, T, H, d_head]): few of them.
MAX_CONTRAST_EFFECTS = 4
MAX_CONTRAST_TABLES = 16
MAX_MEANS = 4
# A traced ablation holds a second run and graph ([L, T, T] floats: 120 MB for 30 layers ×
# 1000 tokens), so few of them.
MAX_ABLATIONS = 8
MAX_FAITHFULNESS = 16
MAX_DATASETS = 8


# -- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelKey:
    """Everything that decides which weights run, and how."""

    spec: ModelSpec
    device: str
    dtype: str


@dataclass(frozen=True)
class TraceKey:
    model: ModelKey
    prompt: str


@dataclass(frozen=True)
class ContrastKey:
    """Target vs distractor at one output position of one trace."""

    trace: TraceKey
    position: int
    target: str
    distractor: str


@dataclass(frozen=True)
class MeansKey:
    """Mean activations of one model over one prompt file (as it was at ``modified_ns``)."""

    model: ModelKey
    path: str
    modified_ns: int


@dataclass(frozen=True)
class AblationKey:
    trace: TraceKey
    position: int
    ablation: Ablation
    means: MeansKey | None
    contrast: tuple[str, str] | None  # target, distractor (already checked)
    latents: LatentEdit | None = None


@dataclass(frozen=True)
class FaithfulnessKey:
    trace: TraceKey
    position: int
    threshold: float
    renormalize: bool
    draws: int  # random-head baselines, seeds 0 … draws − 1
    mode: Mode
    means: MeansKey | None
    target: str | None
    distractor: str | None


@dataclass(frozen=True)
class PromptFileKey:
    """A prompt file inside ``prompts_dir`` as it was at ``modified_ns``."""

    name: str
    path: str
    modified_ns: int


@dataclass(frozen=True)
class DatasetKey:
    """Dataset mode over one file (``b`` None) or a comparison of two."""

    model: ModelKey
    a: PromptFileKey
    b: PromptFileKey | None
    threshold: float


# -- cached values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and how long it took to load."""

    llm: BridgeLlm
    load_seconds: float


@dataclass(frozen=True)
class CachedTrace:
    """The engine's trace of one prompt, with its cache key and how long it took."""

    key: TraceKey
    trace: Trace
    seconds: float


# Dataset mode's result: one file's table, or two files compared.
Dataset: TypeAlias = DatasetComparison | pd.DataFrame


class Store:
    """The process-wide caches shared by every browser session (see the module docstring)."""

    def __init__(self) -> None:
        self.models: BoundedCache[ModelKey, LoadedModel] = BoundedCache(MAX_MODELS)
        self.traces: BoundedCache[TraceKey, CachedTrace] = BoundedCache(MAX_TRACES)
        self.layer_runs: BoundedCache[tuple[TraceKey, int], LayerRun] = BoundedCache(MAX_LAYER_RUNS)
        self.attends: BoundedCache[tuple[TraceKey, int, int, int, int], Attend] = BoundedCache(
            MAX_ATTENDS
        )
        self.corpus_indexes: BoundedCache[tuple[str, str | None, Kind, int], CorpusIndex] = (
            BoundedCache(MAX_CORPUS_INDEXES)
        )
        self.unit_reports: BoundedCache[tuple[str, Kind, int, int], UnitReport] = BoundedCache(
            MAX_UNIT_REPORTS
        )
        self.head_maps: BoundedCache[tuple[TraceKey, int], torch.Tensor] = BoundedCache(
            MAX_HEAD_MAPS
        )
        self.contrast_effects: BoundedCache[
            ContrastKey, tuple[Contrast, DirectEffects, Attributions]
        ] = BoundedCache(MAX_CONTRAST_EFFECTS)
        self.contrast_tables: BoundedCache[tuple[ContrastKey, float, bool], ContrastAnalysis] = (
            BoundedCache(MAX_CONTRAST_TABLES)
        )
        self.means: BoundedCache[MeansKey, MeanActivations] = BoundedCache(MAX_MEANS)
        self.ablations: BoundedCache[AblationKey, AblationResult] = BoundedCache(MAX_ABLATIONS)
        self.faithfulness: BoundedCache[FaithfulnessKey, FaithfulnessReport] = BoundedCache(
            MAX_FAITHFULNESS
        )
        self.datasets: BoundedCache[DatasetKey, Dataset] = BoundedCache(MAX_DATASETS)


@st.cache_resource(show_spinner=False)
def store() -> Store:
    return Store()


# -- models and traces ------------------------------------------------------------------------


def cached_model(key: ModelKey) -> LoadedModel | None:
    return store().models.peek(key)


def get_model(key: ModelKey, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """The loaded model for ``key``; loads it (reporting to ``progress``) when not cached."""

    def load() -> LoadedModel:
        start = time.perf_counter()
        llm = load_model(key.spec, device=key.device, dtype=key.dtype, progress=progress)
        return LoadedModel(llm, time.perf_counter() - start)

    return store().models.get(key, load)


def cached_trace(key: TraceKey) -> CachedTrace | None:
    return store().traces.peek(key)


def get_trace(
    key: TraceKey, model: LoadedModel, on_layer: Callable[[int, int], None] | None = None
) -> CachedTrace:
    """The trace for ``key``, running the model only when it is not cached. Attention patterns
    are kept while they fit the engine's budget; past it, views recompute what they read
    (:func:`layer_run`)."""

    def compute() -> CachedTrace:
        start = time.perf_counter()
        traced = trace(model.llm, key.prompt, on_layer=on_layer)
        return CachedTrace(key, traced, time.perf_counter() - start)

    return store().traces.get(key, compute)


def layer_run(cached: CachedTrace, layer: int) -> LayerRun:
    """``layer`` of the trace's run with its whole attention pattern: the run's own when it kept
    it, else recomputed (one pass up to that layer)."""
    run = cached.trace.run
    if run.layers[layer].holds_attention(None):
        return run.layers[layer]
    return store().layer_runs.get(
        (cached.key, layer), lambda: run.with_attention({layer: None}).layers[layer]
    )


def head_map(cached: CachedTrace, layer: int) -> torch.Tensor:
    """Per-head contributions of every query of ``layer`` → [T, S, H] (CPU, float32)."""

    def compute() -> torch.Tensor:
        rows = torch.arange(cached.trace.n_tokens, device=cached.trace.run.logits.device)
        heads, _ = layer_head_contributions(layer_run(cached, layer), rows)
        return heads.cpu()

    return store().head_maps.get((cached.key, layer), compute)


def attend(cached: CachedTrace, layer: int, head: int, query: int, source: int) -> Attend:
    """QK attribution of an attention edge for one head (one pass over the residual's parts
    up to ``layer``), cached per (trace, layer, head, query, source)."""
    return store().attends.get(
        (cached.key, layer, head, query, source),
        lambda: attend_edge(cached.trace, layer, head, query, source),
    )


def corpus_index(llm: TransparentLlm, corpus: Path | None, kind: Kind, layer: int) -> CorpusIndex:
    """The newest saved corpus index of ``llm`` over ``corpus`` (None: the shipped one) that
    covers ``kind`` units of ``layer``, loaded once; :class:`IndexNotFoundError` (not cached)
    while there is none."""
    key = (model_key(llm), None if corpus is None else str(corpus), kind, layer)
    return store().corpus_indexes.get(key, lambda: find_index(llm, corpus, kind, layer))


def unit_report(
    llm: TransparentLlm, corpus: Path | None, kind: Kind, layer: int, unit: int
) -> UnitReport:
    """A unit's top examples, histogram and automatic summary from :func:`corpus_index`."""
    index = corpus_index(llm, corpus, kind, layer)
    return store().unit_reports.get(
        (str(index.path), kind, layer, unit),
        lambda: make_unit_report(llm, index, kind, layer, unit),
    )


def build_corpus_index(
    llm: TransparentLlm,
    corpus: Path | None,
    layer: int,
    max_tokens: int | None,
    progress: IndexProgress,
) -> None:
    """Index ``layer`` of ``llm`` over ``corpus`` (saved in the cache dir, where
    :func:`corpus_index` finds it next)."""
    build_index(llm, corpus, layers=[layer], max_tokens=max_tokens, progress=progress)


# -- analyses ---------------------------------------------------------------------------------


def contrast_analysis(
    cached: CachedTrace, route: Route, target: str, distractor: str
) -> ContrastAnalysis:
    """Contrast, direct effects, attributions and ``route``'s effect table (``route``: one output
    position of ``cached``'s graph).

    The backward pass runs once per (trace, position, target, distractor); a threshold or
    renormalize change only rebuilds the table. Raises ``ContrastError`` for bad tokens.
    """
    traced = cached.trace
    key = ContrastKey(cached.key, route.positions[0], target, distractor)

    def effects() -> tuple[Contrast, DirectEffects, Attributions]:
        c = contrast(traced, target, distractor, key.position)
        return c, direct_effects(traced, c), attribute(traced, c)

    c, direct, attributions = store().contrast_effects.get(key, effects)

    def table() -> ContrastAnalysis:
        rows = effect_rows(traced, route, direct, attributions)
        return ContrastAnalysis(contrast=c, direct=direct, attributions=attributions, rows=rows)

    return store().contrast_tables.get((key, route.threshold, route.renormalize), table)


def means_key(cfg: AppConfig, model_key: ModelKey, name: str) -> MeansKey:
    """The key of the mean activations over prompt file ``name`` (only inside ``prompts_dir``:
    ``cfg.prompt_file`` raises ``PromptError`` otherwise)."""
    path = cfg.prompt_file(name)
    return MeansKey(model_key, str(path), path.stat().st_mtime_ns)


def get_means(
    key: MeansKey, model: LoadedModel, on_prompt: Callable[[int, int], None] | None = None
) -> MeanActivations:
    path = Path(key.path)

    def compute() -> MeanActivations:
        return mean_activations(model.llm, prompts_of(path), source=path.name, on_prompt=on_prompt)

    return store().means.get(key, compute)


def get_ablation(
    key: AblationKey,
    cached: CachedTrace,
    means: MeanActivations | None,
    on_layer: Callable[[int, int], None] | None = None,
) -> AblationResult:
    """Before/after of ``key.ablation`` and ``key.latents`` on ``cached`` (validated by the
    core: ``InterventionError``, ``SaeError``), traced so that :meth:`AblationResult.route_diff`
    works."""

    def compute() -> AblationResult:
        target_id = distractor_id = None
        if key.contrast is not None:
            target_id, distractor_id = contrast_ids(cached.trace.llm, *key.contrast)
        edit, llm = key.latents, cached.trace.llm
        return ablate(
            cached.trace,
            key.ablation,
            hooks=[]
            if edit is None
            else latent_hooks(llm, get_sae(edit.sae), edit.indices, edit.scale),
            means=means,
            position=key.position,
            target_id=target_id,
            distractor_id=distractor_id,
            traced=True,
            on_layer=on_layer,
        )

    return store().ablations.get(key, compute)


def cached_ablation(key: AblationKey) -> AblationResult | None:
    return store().ablations.peek(key)


def get_faithfulness(
    key: FaithfulnessKey,
    cached: CachedTrace,
    means: MeanActivations | None,
    on_step: Callable[[int, int], None] | None = None,
) -> FaithfulnessReport:
    def compute() -> FaithfulnessReport:
        return faithfulness(
            cached.trace,
            threshold=key.threshold,
            renormalize=key.renormalize,
            target=key.target,
            distractor=key.distractor,
            position=key.position,
            mode=key.mode,
            means=means,
            seeds=tuple(range(key.draws)),
            on_step=on_step,
        )

    return store().faithfulness.get(key, compute)


def cached_faithfulness(key: FaithfulnessKey) -> FaithfulnessReport | None:
    return store().faithfulness.peek(key)


# -- dataset mode and prompt files ------------------------------------------------------------


def prompt_file_key(cfg: AppConfig, name: str) -> PromptFileKey:
    """A user-chosen prompt file, only from ``prompts_dir`` (``PromptError`` otherwise)."""
    path = cfg.prompt_file(name)
    return PromptFileKey(name, str(path), path.stat().st_mtime_ns)


def get_dataset(
    key: DatasetKey, model: LoadedModel, on_prompt: Callable[[int, int], None] | None = None
) -> Dataset:
    """The route-frequency table of ``key.a`` or, with ``key.b``, the comparison of both."""

    def compute() -> Dataset:
        a = prompts_of(Path(key.a.path))
        if key.b is None:
            return dataset_frequencies(model.llm, a, threshold=key.threshold, on_prompt=on_prompt)
        b = prompts_of(Path(key.b.path))
        return compare_prompts(model.llm, a, b, threshold=key.threshold, on_prompt=on_prompt)

    return store().datasets.get(key, compute)


def cached_dataset(key: DatasetKey) -> Dataset | None:
    return store().datasets.peek(key)


@st.cache_data(max_entries=32, show_spinner=False)
def prompts_in(path: str, modified_ns: int) -> list[str]:
    """The prompts of a file; ``modified_ns`` is in the key so an edited file is re-read."""
    del modified_ns
    return read_prompt_file(Path(path))


def prompts_of(path: Path) -> list[str]:
    return prompts_in(str(path), path.stat().st_mtime_ns)
