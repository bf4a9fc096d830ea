"""All Streamlit caching and session state of the explorer, in this one module.

**Caching.** One process-wide :class:`Store` (``st.cache_resource``) holds three bounded LRU
caches, each keyed by every argument that changes its result:

- loaded models by ``(spec, device, dtype)``;
- traces — the forward pass plus the full contribution graph — by ``(model key, prompt)``;
- per-head contribution maps by ``(trace key, layer)``;
- "why A instead of B?": the direct effects and attributions by ``(trace key, position, target,
  distractor)`` (one backward pass), and the route's effect table by that plus ``(threshold,
  renormalize)``;
- mean activations for mean ablation by ``(model key, prompt file, its mtime)``; ablation
  results, faithfulness reports and dataset tables by everything they were asked with.

Moving the threshold slider or a toggle therefore re-runs only ``find_route`` and the drawing.
Traces are immutable (frozen ``ModelRun``/``FlowGraph``), so browser sessions share them without
mixing results; nothing holds a mutable "last run". A loaded model is shared too: TransformerLens
adds hooks to the shared modules during a forward pass, so :class:`~llm_flow.models.BridgeLlm`
lets one pass at a time run on a model (its own lock).

The caches are our own rather than ``st.cache_resource(max_entries=...)`` per function because
loading reports progress into the page (``st.status``), which Streamlit's caches would record and
replay, and because a per-key lock lets two sessions asking for the same model wait for one load.

**Session state.** Widget values and the current selection. They are initialised once per
browser session from the URL (``st.query_params``) and written back after every run, so a link
reproduces the view.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pandas as pd
import streamlit as st
import torch

from app.prompts import check_prompt
from app.selection import clicked, parse_position, selected_row
from llm_flow.analyses.contrast import (
    Attributions,
    Contrast,
    ContrastAnalysis,
    DirectEffects,
    attribute,
    contrast,
    contrast_ids,
    direct_effects,
    effect_rows,
)
from llm_flow.analyses.dataset import DatasetComparison, compare_prompt_files, dataset_frequencies
from llm_flow.analyses.faithfulness import FaithfulnessReport, faithfulness
from llm_flow.analyses.interventions import (
    Ablation,
    AblationResult,
    MeanActivations,
    ablate,
    ablated_trace,
)
from llm_flow.analyses.interventions import mean_activations as compute_means
from llm_flow.config import AppConfig, ModelSpec
from llm_flow.engine.graph import FlowGraph, layer_head_contributions, trace
from llm_flow.engine.routes import DEFAULT_THRESHOLD, Route
from llm_flow.errors import LlmFlowError
from llm_flow.io.export import Prediction
from llm_flow.io.prompts import read_prompt_file
from llm_flow.models import BridgeLlm, ModelRun, load_model

# Bounds of the process-wide caches. Two models: switching back and forth stays instant while
# a 7B model in bf16 (~14 GB) cannot pile up; traces are small next to a model.
MAX_MODELS = 2
MAX_TRACES = 16
MAX_HEAD_MAPS = 32
# Attributions keep ∂LD/∂z for every head and position ([L, T, H, d_head]): few of them.
MAX_CONTRAST_EFFECTS = 4
MAX_CONTRAST_TABLES = 16
MAX_MEANS = 4
MAX_ABLATIONS = 32
MAX_ABLATED_GRAPHS = 8  # a graph is [L, T, T] floats: 120 MB for 30 layers × 1000 tokens
MAX_FAITHFULNESS = 16
MAX_DATASETS = 8

THRESHOLD_MAX = 0.2

# Session-state keys of widgets (the widgets are created with these keys).
MODEL = "model"
CUSTOM_MODEL = "custom_model"
DEVICE = "device"
DTYPE = "dtype"
PROMPT = "prompt"
NEW_PROMPT = "new_prompt"
PROMPT_FILE = "prompt_file"
THRESHOLD = "threshold"
RENORMALIZE = "renormalize"
NORMALIZE_LENS = "normalize_lens"
POSITION = "position"
GRAPH = "graph"
TARGET = "target"
DISTRACTOR = "distractor"
EFFECTS_TABLE = "effects_table"
ABLATE_HEADS = "ablate_heads"
ABLATE_NEURONS = "ablate_neurons"
ABLATE_EDGE = "ablate_edge"
ABLATION_MODE = "ablation_mode"
MEAN_FILE = "mean_file"
FAITHFULNESS_DRAWS = "faithfulness_draws"
INTERVENTIONS = "interventions_open"  # the ablation/faithfulness expander
DATASET_A = "dataset_a"
DATASET_B = "dataset_b"
# Session-state keys of values no widget owns.
SELECTION = "selection"
_EXTRA_PROMPTS = "extra_prompts"
_FILE_PROMPTS = "file_prompts"
_PROMPT_ERROR = "prompt_error"
_NOTICES = "notices"
_VIEW = "view"
_INITIALIZED = "initialized"
SHOWN_ABLATION = "shown_ablation"
_TABLE_ROW = "table_row"
_SHOWN_DATASET = "shown_dataset"
_PREFERRED_UNIT = "preferred_unit"
SHOWN_FAITHFULNESS = "shown_faithfulness"

CUSTOM_CHOICE = "Custom model…"

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


# -- caches -----------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class AblatedGraphKey:
    """The contribution graph of one trace's prompt with an ablation applied."""

    trace: TraceKey
    ablation: Ablation
    means: MeansKey | None


@dataclass(frozen=True)
class FaithfulnessKey:
    trace: TraceKey
    position: int
    threshold: float
    renormalize: bool
    draws: int  # random-head baselines, seeds 0 … draws − 1
    mode: str
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


class LoadedModel:
    """A loaded model and how long it took to load."""

    def __init__(self, llm: BridgeLlm, load_seconds: float) -> None:
        self.llm = llm
        self.load_seconds = load_seconds


@dataclass(frozen=True)
class Trace:
    """One prompt's forward pass, full graph and every position's greedy prediction."""

    key: TraceKey
    run: ModelRun
    graph: FlowGraph
    predictions: tuple[Prediction, ...]
    seconds: float


class Store:
    """The process-wide caches shared by every browser session."""

    def __init__(self) -> None:
        self.models: BoundedCache[ModelKey, LoadedModel] = BoundedCache(MAX_MODELS)
        self.traces: BoundedCache[TraceKey, Trace] = BoundedCache(MAX_TRACES)
        self.head_maps: BoundedCache[tuple[TraceKey, int], torch.Tensor] = BoundedCache(
            MAX_HEAD_MAPS
        )
        self.contrast_effects: BoundedCache[
            ContrastKey, tuple[Contrast, DirectEffects, Attributions]
        ] = BoundedCache(MAX_CONTRAST_EFFECTS)
        self.contrasts: BoundedCache[tuple[ContrastKey, float, bool], ContrastAnalysis] = (
            BoundedCache(MAX_CONTRAST_TABLES)
        )
        self.means: BoundedCache[MeansKey, MeanActivations] = BoundedCache(MAX_MEANS)
        self.ablations: BoundedCache[AblationKey, AblationResult] = BoundedCache(MAX_ABLATIONS)
        self.ablated_graphs: BoundedCache[AblatedGraphKey, FlowGraph] = BoundedCache(
            MAX_ABLATED_GRAPHS
        )
        self.faithfulness: BoundedCache[FaithfulnessKey, FaithfulnessReport] = BoundedCache(
            MAX_FAITHFULNESS
        )
        self.datasets: BoundedCache[DatasetKey, DatasetComparison | pd.DataFrame] = BoundedCache(
            MAX_DATASETS
        )


@st.cache_resource(show_spinner=False)
def store() -> Store:
    return Store()


def cached_model(key: ModelKey) -> LoadedModel | None:
    return store().models.peek(key)


def get_model(key: ModelKey, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """The loaded model for ``key``; loads it (reporting to ``progress``) when not cached.

    ``progress`` does not change the result, so it is not part of the key.
    """

    def load() -> LoadedModel:
        start = time.perf_counter()
        llm = load_model(key.spec, device=key.device, dtype=key.dtype, progress=progress)
        return LoadedModel(llm, time.perf_counter() - start)

    return store().models.get(key, load)


def cached_trace(key: TraceKey) -> Trace | None:
    return store().traces.peek(key)


def get_trace(
    key: TraceKey, model: LoadedModel, on_layer: Callable[[int, int], None] | None = None
) -> Trace:
    """The trace for ``key``, running the model only when it is not cached."""

    def compute() -> Trace:
        start = time.perf_counter()
        run, graph = trace(model.llm, key.prompt, keep_patterns=True, on_layer=on_layer)
        probs, ids = run.logits.softmax(-1).max(-1)  # [T], [T]
        id_list = ids.tolist()
        strings = model.llm.token_strings(id_list)
        predictions = tuple(
            Prediction(token=s, id=i, prob=p)
            for s, i, p in zip(strings, id_list, probs.tolist(), strict=True)
        )
        return Trace(key, run, graph, predictions, time.perf_counter() - start)

    return store().traces.get(key, compute)


def head_map(trace_: Trace, layer: int) -> torch.Tensor:
    """Per-head contributions of every query of ``layer`` → [T, S, H] (CPU, float32).

    Pure math on the immutable run, so no model lock is needed.
    """

    def compute() -> torch.Tensor:
        run = trace_.run
        rows = torch.arange(run.n_tokens, device=run.logits.device)
        heads, _ = layer_head_contributions(run.layers[layer], rows)
        return heads.cpu()

    return store().head_maps.get((trace_.key, layer), compute)


def contrast_analysis(
    trace_: Trace, model: LoadedModel, route: Route, target: str, distractor: str
) -> ContrastAnalysis:
    """Contrast, direct effects, attributions and ``route``'s effect table.

    The backward pass runs once per (trace, position, target, distractor); a threshold or
    renormalize change only rebuilds the table. Raises ``ContrastError`` for bad tokens.
    """
    llm, run = model.llm, trace_.run
    key = ContrastKey(trace_.key, route.positions[0], target, distractor)

    def effects() -> tuple[Contrast, DirectEffects, Attributions]:
        c = contrast(llm, run, target, distractor, key.position)
        return c, direct_effects(llm, run, c), attribute(llm, run, c)

    c, direct, attributions = store().contrast_effects.get(key, effects)

    def table() -> ContrastAnalysis:
        rows = effect_rows(run, route, direct, attributions)
        return ContrastAnalysis(contrast=c, direct=direct, attributions=attributions, rows=rows)

    return store().contrasts.get((key, route.threshold, route.renormalize), table)


def contrast_token_ids(model: LoadedModel, target: str, distractor: str) -> tuple[int, int]:
    return contrast_ids(model.llm, target, distractor)


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
        return compute_means(model.llm, prompts_of(path), source=path.name, on_prompt=on_prompt)

    return store().means.get(key, compute)


def get_ablation(
    key: AblationKey, model: LoadedModel, means: MeanActivations | None
) -> AblationResult:
    """Before/after of ``key.ablation`` (validated by the core: ``InterventionError``)."""

    def compute() -> AblationResult:
        target_id = distractor_id = None
        if key.contrast is not None:
            target_id, distractor_id = contrast_token_ids(model, *key.contrast)
        return ablate(
            model.llm,
            key.trace.prompt,
            key.ablation,
            means=means,
            position=key.position,
            target_id=target_id,
            distractor_id=distractor_id,
        )

    return store().ablations.get(key, compute)


def get_ablated_graph(
    key: AblatedGraphKey,
    model: LoadedModel,
    means: MeanActivations | None,
    on_layer: Callable[[int, int], None] | None = None,
) -> FlowGraph:
    """The contribution graph of the ablated forward pass (for the route diff)."""

    def compute() -> FlowGraph:
        llm, prompt = model.llm, key.trace.prompt
        run_graph = ablated_trace(
            llm, prompt, key.ablation, means, keep_patterns=False, on_layer=on_layer
        )
        return run_graph[1]

    return store().ablated_graphs.get(key, compute)


def cached_ablated_graph(key: AblatedGraphKey) -> FlowGraph | None:
    return store().ablated_graphs.peek(key)


def get_faithfulness(
    key: FaithfulnessKey,
    model: LoadedModel,
    means: MeanActivations | None,
    on_step: Callable[[int, int], None] | None = None,
) -> FaithfulnessReport:
    def compute() -> FaithfulnessReport:
        return faithfulness(
            model.llm,
            key.trace.prompt,
            threshold=key.threshold,
            renormalize=key.renormalize,
            target=key.target,
            distractor=key.distractor,
            position=key.position,
            mode="mean" if key.mode == "mean" else "zero",
            means=means,
            seeds=tuple(range(key.draws)),
            on_step=on_step,
        )

    return store().faithfulness.get(key, compute)


def cached_ablation(key: AblationKey) -> AblationResult | None:
    return store().ablations.peek(key)


def cached_faithfulness(key: FaithfulnessKey) -> FaithfulnessReport | None:
    return store().faithfulness.peek(key)


def prompt_file_key(cfg: AppConfig, name: str) -> PromptFileKey:
    """A user-chosen prompt file, only from ``prompts_dir`` (``PromptError`` otherwise)."""
    path = cfg.prompt_file(name)
    return PromptFileKey(name, str(path), path.stat().st_mtime_ns)


def get_dataset(
    key: DatasetKey, model: LoadedModel, on_prompt: Callable[[int, int], None] | None = None
) -> DatasetComparison | pd.DataFrame:
    """The route-frequency table of ``key.a`` or, with ``key.b``, the comparison of both."""

    def compute() -> DatasetComparison | pd.DataFrame:
        if key.b is None:
            prompts = prompts_of(Path(key.a.path))
            return dataset_frequencies(
                model.llm, prompts, threshold=key.threshold, on_prompt=on_prompt
            )
        return compare_prompt_files(
            model.llm, key.a.path, key.b.path, threshold=key.threshold, on_prompt=on_prompt
        )

    return store().datasets.get(key, compute)


def cached_dataset(key: DatasetKey) -> DatasetComparison | pd.DataFrame | None:
    return store().datasets.peek(key)


@st.cache_data(max_entries=32, show_spinner=False)
def prompts_in(path: str, modified_ns: int) -> list[str]:
    """The prompts of a file; ``modified_ns`` is in the key so an edited file is re-read."""
    del modified_ns
    return read_prompt_file(Path(path))


def prompts_of(path: Path) -> list[str]:
    return prompts_in(str(path), path.stat().st_mtime_ns)


# -- session state ----------------------------------------------------------------------------


def init_session(cfg: AppConfig) -> None:
    """Set every widget's starting value once per browser session, from the URL if it has one.

    Widgets are then created with keys only (no ``value=``/``index=``), so Streamlit never sees
    two competing defaults.
    """
    ss = st.session_state
    if ss.get(_INITIALIZED):
        return
    ss[_INITIALIZED] = True
    params = st.query_params
    notices: list[str] = []

    model = params.get("model")
    if model in cfg.model_names():
        ss[MODEL] = model
    elif model and not cfg.demo_mode:
        ss[MODEL] = CUSTOM_CHOICE
        ss[CUSTOM_MODEL] = model
    else:
        ss[MODEL] = cfg.default_model
        if model:
            notices.append(
                f"The link's model {model!r} is not available here; showing {cfg.default_model!r}."
            )
    ss.setdefault(CUSTOM_MODEL, "")
    ss[DEVICE] = "cpu"
    ss[DTYPE] = "float32"

    prompt = params.get("prompt")
    ss[_EXTRA_PROMPTS] = [prompt] if prompt else []
    ss[_FILE_PROMPTS] = None
    if prompt:
        ss[PROMPT] = prompt
    ss[NEW_PROMPT] = ""

    ss[THRESHOLD] = DEFAULT_THRESHOLD
    raw_threshold = params.get("threshold")
    if raw_threshold is not None:
        try:
            value = float(raw_threshold)
        except ValueError:
            value = -1.0
        if 0.0 <= value <= THRESHOLD_MAX:
            ss[THRESHOLD] = value
        else:
            notices.append(
                f"The link's threshold {raw_threshold!r} is not between 0 and {THRESHOLD_MAX}; "
                f"using {DEFAULT_THRESHOLD}."
            )
    ss[RENORMALIZE] = params.get("renormalize", "1") != "0"
    ss[NORMALIZE_LENS] = params.get("normalize", "1") != "0"

    raw_position = params.get("position")
    if raw_position is not None:
        if raw_position.isdigit():
            ss[POSITION] = int(raw_position)
        else:
            notices.append(f"The link's position {raw_position!r} is not a token index.")
    ss[SELECTION] = params.get("selection") or None
    # Kept exactly as typed: " Mary" (with its space) and "Mary" are different tokens.
    ss[TARGET] = params.get("target", "")
    ss[DISTRACTOR] = params.get("distractor", "")
    ss[ABLATE_HEADS] = []
    ss[ABLATE_NEURONS] = ""
    ss[ABLATE_EDGE] = False
    ss[ABLATION_MODE] = "zero"
    ss[_NOTICES] = notices


def take_notices() -> list[str]:
    """Messages for the user that arose outside the page (URL parsing, callbacks), once each."""
    notices: list[str] = st.session_state.get(_NOTICES, [])
    st.session_state[_NOTICES] = []
    return notices


def prompt_choices(cfg: AppConfig) -> list[str]:
    """Prompts the picker offers: added ones first, then a loaded file's, then the preloaded."""
    ss = st.session_state
    choices: list[str] = list(ss.get(_EXTRA_PROMPTS, []))
    loaded = ss.get(_FILE_PROMPTS)
    if loaded is not None:
        choices += loaded[1]
    preloaded = cfg.preloaded_dataset_filename
    if preloaded is not None and preloaded.is_file():
        choices += prompts_of(preloaded)
    return list(dict.fromkeys(choices))


def loaded_file_name() -> str | None:
    loaded = st.session_state.get(_FILE_PROMPTS)
    return None if loaded is None else str(loaded[0])


def take_prompt_error() -> str | None:
    """The last prompt action's error, shown once."""
    error: str | None = st.session_state.pop(_PROMPT_ERROR, None)
    return error


def add_prompt(limit: int | None) -> None:
    """Callback of "Add prompt": check the typed prompt and select it."""
    ss = st.session_state
    text = ss.get(NEW_PROMPT, "")
    try:
        check_prompt(text, limit)
    except LlmFlowError as exc:
        ss[_PROMPT_ERROR] = str(exc)
        return
    ss[_PROMPT_ERROR] = None
    extra = [p for p in ss.get(_EXTRA_PROMPTS, []) if p != text]
    ss[_EXTRA_PROMPTS] = [text, *extra]
    ss[PROMPT] = text
    ss[NEW_PROMPT] = ""


def load_prompt_file(cfg: AppConfig) -> None:
    """Callback of "Load prompts": only files inside ``prompts_dir`` (``cfg.prompt_file``)."""
    ss = st.session_state
    name = ss.get(PROMPT_FILE)
    try:
        if not name:
            raise LlmFlowError("choose a prompt file first")
        path = cfg.prompt_file(name)
        prompts = prompts_of(path)
        if not prompts:
            raise LlmFlowError(f"{name!r} holds no prompts; choose another file")
    except LlmFlowError as exc:
        ss[_PROMPT_ERROR] = str(exc)
        return
    ss[_PROMPT_ERROR] = None
    ss[_FILE_PROMPTS] = (name, prompts)
    ss[PROMPT] = prompts[0]


def on_graph_select() -> None:
    """Callback of the graph's ``on_select``: a click selects an edge, block or node, or an
    output position.

    The chart's own widget state cannot be the selection: Streamlit re-creates the chart (and
    empties its state) whenever the figure changes, e.g. on every slider move. So a click is
    copied into ``SELECTION``, which only another click (or "Clear selection") replaces. An empty
    event (a click on empty space, a re-created chart) keeps the selection.
    """
    target = clicked(st.session_state.get(GRAPH))
    if target is None:
        return
    position = parse_position(target)
    if position is not None:
        st.session_state[POSITION] = position
    else:
        st.session_state[SELECTION] = target


def take_table_selection(ids: Sequence[str], units: Sequence[int | None] = ()) -> None:
    """Select the graph element of the effect table's newly selected row (``ids[i]`` is row
    i's selection string, ``units[i]`` its head or neuron, which the panel then preselects).

    Read at the top of a run, before the graph is drawn, so the highlight follows at once. Only
    a *change* of the table's row selects: the table keeps its row across reruns, and a later
    click on the graph must win. Rows count in the table's original order, whatever sorting the
    user applied in the browser.
    """
    ss = st.session_state
    row = selected_row(ss.get(EFFECTS_TABLE))
    if row == ss.get(_TABLE_ROW):
        return
    ss[_TABLE_ROW] = row
    if row is not None and 0 <= row < len(ids):
        ss[SELECTION] = ids[row]
        ss[_PREFERRED_UNIT] = (ids[row], units[row] if row < len(units) else None)


def preferred_unit(selection_id: str) -> int | None:
    """The head or neuron of the table row that selected ``selection_id``, if one did."""
    preferred = st.session_state.get(_PREFERRED_UNIT)
    if isinstance(preferred, tuple) and preferred[0] == selection_id:
        unit: int | None = preferred[1]
        return unit
    return None


def show_ablation(key: AblationKey) -> None:
    st.session_state[SHOWN_ABLATION] = key


def shown_ablation() -> AblationKey | None:
    key: AblationKey | None = st.session_state.get(SHOWN_ABLATION)
    return key


def show_dataset(key: DatasetKey) -> None:
    st.session_state[_SHOWN_DATASET] = key


def shown_dataset() -> DatasetKey | None:
    key: DatasetKey | None = st.session_state.get(_SHOWN_DATASET)
    return key


def show_faithfulness(key: FaithfulnessKey) -> None:
    st.session_state[SHOWN_FAITHFULNESS] = key


def shown_faithfulness() -> FaithfulnessKey | None:
    key: FaithfulnessKey | None = st.session_state.get(SHOWN_FAITHFULNESS)
    return key


def select(selection: str | None) -> None:
    st.session_state[SELECTION] = selection


def selection() -> str | None:
    value: str | None = st.session_state.get(SELECTION)
    return value


def start_view(view: tuple[str, str], n_tokens: int) -> None:
    """Forget the position and selection when the model or prompt changes; clamp the position.

    The first view of a session keeps what the URL said (it is checked against the graph).
    """
    ss = st.session_state
    if ss.get(_VIEW) != view:
        if _VIEW in ss:
            ss[SELECTION] = None
            ss.pop(POSITION, None)
        ss[_VIEW] = view
    position = ss.get(POSITION)
    if not isinstance(position, int) or not 0 <= position < n_tokens:
        if position is not None:
            ss.setdefault(_NOTICES, []).append(
                f"Position {position} is outside this prompt's {n_tokens} tokens; "
                "showing the last token."
            )
        ss[POSITION] = n_tokens - 1


def write_query_params(params: dict[str, Any]) -> None:
    """Put the current view into the URL (only when it changed, to keep history clean)."""
    wanted = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)
