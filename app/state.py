"""All Streamlit caching and session state of the explorer, in this one module.

**Caching.** One process-wide :class:`Store` (``st.cache_resource``) holds three bounded LRU
caches, each keyed by every argument that changes its result:

- loaded models by ``(spec, device, dtype)``;
- traces — the forward pass plus the full contribution graph — by ``(model key, prompt)``;
- per-head contribution maps by ``(trace key, layer)``.

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
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import streamlit as st
import torch

from app.prompts import check_prompt
from app.selection import clicked, parse_position
from llm_flow.config import AppConfig, ModelSpec
from llm_flow.errors import LlmFlowError
from llm_flow.export import Prediction
from llm_flow.graph import FlowGraph, layer_head_contributions, trace
from llm_flow.models import BridgeLlm, ModelRun, load_model
from llm_flow.prompts import read_prompt_file
from llm_flow.routes import DEFAULT_THRESHOLD

# Bounds of the process-wide caches. Two models: switching back and forth stays instant while
# a 7B model in bf16 (~14 GB) cannot pile up; traces are small next to a model.
MAX_MODELS = 2
MAX_TRACES = 16
MAX_HEAD_MAPS = 32

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
# Session-state keys of values no widget owns.
SELECTION = "selection"
_EXTRA_PROMPTS = "extra_prompts"
_FILE_PROMPTS = "file_prompts"
_PROMPT_ERROR = "prompt_error"
_NOTICES = "notices"
_VIEW = "view"
_INITIALIZED = "initialized"

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
