"""Dataset mode and the corpus index as Ray jobs: the work that outgrows one machine.

Both jobs are embarrassingly parallel: dataset mode over prompts, the corpus index over token
windows. Each Ray worker is an actor that loads the model once, from the same config entry,
device and dtype the caller resolved (a :class:`ModelRecipe`, never the model itself), and then
takes chunks of work as they come (:meth:`WorkerPool.dataset`, :meth:`WorkerPool.index`). The
results are put together exactly as the in-process path puts its own together:

- dataset mode: every prompt's :class:`~llm_flow.analyses.dataset.Appearances` comes back and
  :func:`~llm_flow.analyses.dataset.frequency_table` adds them in prompt order, so the table is
  the in-process table bit for bit;
- the corpus index: every worker indexes its chunks of windows with
  :func:`~llm_flow.analyses.corpus_index.index_windows` and merges them into its own index; the
  driver merges the workers' indexes with :func:`~llm_flow.analyses.corpus_index.merge` (top k of
  the union under a strict order, histograms added: the same index whatever the split). The
  driver reads and cuts the corpus itself (the workers tokenize its pieces), so window numbers
  are the in-process ones.

The driver never loads the model. This is the only module that imports ``ray``, and only when a
job runs: nothing imports this module unless ``--ray`` (or ``ray=``) asks for it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from llm_flow.analyses.corpus_index import (
    BATCH_WINDOWS,
    CorpusIndex,
    IndexProgress,
    IndexSettings,
    check_saes,
    index_windows,
    merge,
)
from llm_flow.analyses.dataset import (
    Appearances,
    check_dataset,
    frequency_table,
    prompt_appearances,
)
from llm_flow.config import ModelSpec
from llm_flow.errors import CorpusError, DistributedError, LlmFlowError
from llm_flow.io.corpus import Corpus, Window, cut_windows, open_corpus
from llm_flow.io.index_store import (
    DEFAULT_K,
    DEFAULT_WINDOW,
    ModelFacts,
    cached_index,
    check_max_tokens,
    index_settings,
)
from llm_flow.validate import check_at_least

if TYPE_CHECKING:
    import pandas as pd

    from llm_flow.models.base import ModelInfo, TransparentLlm
    from llm_flow.models.sae import Sae

LOCAL = "local"  # the address that starts a local cluster for the job
DEFAULT_CPU_WORKERS = 2
RAY_PORT = 6379  # the head's port when an address names only a host
CONNECT_TIMEOUT_S = 10.0
ENCODE_PIECES = 8  # corpus pieces a worker tokenizes per call
INSTALL_HINT = "pip install 'llm-flow[ray]'"

T = TypeVar("T")


@dataclass(frozen=True)
class ModelRecipe:
    """How every worker loads the model: a config entry, a device and a dtype, as
    :func:`~llm_flow.models.load_model` takes them. The entry's paths must mean the same file on
    every node of the cluster."""

    spec: ModelSpec
    device: str | None = None
    dtype: str = "float32"

    @property
    def gpu(self) -> bool:
        return self.device is not None and self.device.startswith("cuda")


@dataclass(frozen=True)
class RayOptions:
    """Where a job runs: ``address`` of a running cluster (``HOST:PORT``, ``auto``) or
    :data:`LOCAL` (a cluster started for the job and stopped after it), and how many workers
    (None: one per GPU of the cluster for a CUDA model, else :data:`DEFAULT_CPU_WORKERS`)."""

    address: str = LOCAL
    workers: int | None = None


def _keep_to_share() -> None:
    """torch's and numba's threads: as many as this Ray worker's CPUs (at least 1)."""
    import numba
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    threads = max(1, int(cpus))
    torch.set_num_threads(min(threads, torch.get_num_threads()))
    numba.set_num_threads(min(threads, numba.get_num_threads()))


class _Worker:
    """A Ray actor's state: the model, loaded once, and the index of the windows it was given.
    A load error is kept and raised by the first call, so the driver sees it as it is."""

    def __init__(self, recipe: ModelRecipe) -> None:
        from llm_flow.engine.graph import contributions_of
        from llm_flow.models import load_model

        self._llm: TransparentLlm | None = None
        self._error: LlmFlowError | None = None
        self._index: CorpusIndex | None = None
        try:
            self._llm = load_model(recipe.spec, device=recipe.device, dtype=recipe.dtype)
        except LlmFlowError as exc:
            self._error = exc
            return
        # Warm up: the first CPU kernel call starts numba's threading layer, which sets the
        # thread count torch runs with from then on. Done here, every prompt and window of the
        # job runs with the same threads, as in a warm in-process run.
        contributions_of(self._llm.run("Warm up the kernels.").layers[0])
        # Then each worker keeps to its share of the node's cores: by default torch and numba
        # each take every core, and two workers on one node would oversubscribe it.
        _keep_to_share()

    def _model(self) -> TransparentLlm:
        if self._error is not None:
            raise self._error
        assert self._llm is not None  # set whenever no error was kept
        return self._llm

    def facts(self) -> tuple[ModelInfo, ModelFacts]:
        llm = self._model()
        return llm.info, ModelFacts.of(llm)

    def encode(self, texts: list[str]) -> list[list[int]]:
        llm = self._model()
        return [llm.encode(text) for text in texts]

    def appearances(self, prompts: list[str], threshold: float) -> list[Appearances]:
        llm = self._model()
        return [prompt_appearances(llm, prompt, threshold) for prompt in prompts]

    def index(
        self, windows: list[Window], settings: IndexSettings, skip: int, saes: list[Sae]
    ) -> tuple[int, int]:
        """Index ``windows`` (and the latents of ``saes``) into this worker's index; (windows,
        tokens) indexed."""
        part = index_windows(self._model(), windows, settings, skip=skip, saes=saes)
        self._index = part if self._index is None else merge(self._index, part)
        return part.n_windows, part.n_tokens

    def take_index(self) -> CorpusIndex | None:
        """This worker's index (None if it got no windows), and a fresh start."""
        index, self._index = self._index, None
        return index


class WorkerPool:
    """Actors that each hold the model once (see :func:`worker_pool`)."""

    def __init__(self, ray: Any, actors: Sequence[Any], info: ModelInfo, facts: ModelFacts) -> None:
        self._ray = ray
        self._actors = list(actors)
        self.info = info
        self.facts = facts

    @property
    def workers(self) -> int:
        return len(self._actors)

    def dataset(
        self,
        prompts: Sequence[str],
        threshold: float,
        on_prompt: Callable[[int, int], None] | None = None,
    ) -> pd.DataFrame:
        """:func:`~llm_flow.analyses.dataset.dataset_frequencies` of ``prompts`` on the
        workers: chunks of prompts go to whichever worker is free; ``on_prompt(done, total)``
        as chunks come back."""
        check_dataset(prompts, threshold)
        size = max(1, min(16, len(prompts) // (4 * self.workers)))
        starts = range(0, len(prompts), size)
        found: dict[int, list[Appearances]] = {}

        def take(start: int, result: list[Appearances]) -> None:
            found[start] = result
            if on_prompt is not None:
                on_prompt(sum(map(len, found.values())), len(prompts))

        jobs = ((s, (list(prompts[s : s + size]), threshold)) for s in starts)
        self._map("appearances", jobs, take)
        ordered = [a for start in sorted(found) for a in found[start]]
        return frequency_table(ordered, self.info.moe_layers)

    def index(
        self,
        windows: Iterable[Window],
        settings: IndexSettings,
        progress: IndexProgress | None = None,
        saes: Sequence[Sae] = (),
    ) -> CorpusIndex:
        """:func:`~llm_flow.analyses.corpus_index.index_windows` of ``windows`` on the workers,
        in chunks of :data:`~llm_flow.analyses.corpus_index.BATCH_WINDOWS`; each worker merges
        its chunks, and the driver the workers' indexes. ``progress(windows, tokens)`` as chunks
        come back."""
        skip = self.facts.skip
        usable = (w for w in windows if len(w.token_ids) > skip)  # as index_windows skips them
        done = [0, 0]

        def take(_: int, counted: tuple[int, int]) -> None:
            done[0] += counted[0]
            done[1] += counted[1]
            if progress is not None:
                progress(done[0], done[1])

        shared = self._ray.put(list(saes))  # sent once, not with every chunk
        jobs = enumerate(
            (chunk, settings, skip, shared) for chunk in _chunks(usable, BATCH_WINDOWS)
        )
        self._map("index", jobs, take)
        parts = [p for p in self._get([a.take_index.remote() for a in self._actors]) if p]
        if not parts:
            raise CorpusError("the corpus holds no text to index")
        running = parts[0]
        for part in parts[1:]:
            running = merge(running, part)
        return running

    def encoded(self, texts: Iterable[str]) -> Iterator[list[int]]:
        """The token ids of each text, in order, tokenized on the workers in turn, a few calls
        ahead: a worker takes one call at a time (in its main thread, where torch's thread count
        is set), so a tokenization waits for the chunk before it, long before it is needed."""
        ahead: deque[Any] = deque()
        for i, group in enumerate(_chunks(texts, ENCODE_PIECES)):
            ahead.append(self._actors[i % self.workers].encode.remote(group))
            if len(ahead) > 2 * self.workers:
                yield from self._get(ahead.popleft())
        while ahead:
            yield from self._get(ahead.popleft())

    def _map(
        self,
        method: str,
        jobs: Iterable[tuple[int, tuple[Any, ...]]],
        take: Callable[[int, Any], None],
    ) -> None:
        """Call ``method`` with each job's arguments on a free worker (one call in flight per
        worker), and ``take(key, result)`` as results come back."""
        free = list(self._actors)
        running: dict[Any, tuple[Any, int]] = {}  # object ref → (actor, job key)
        pending = iter(jobs)
        while True:
            while free and (job := next(pending, None)) is not None:
                actor = free.pop()
                running[getattr(actor, method).remote(*job[1])] = (actor, job[0])
            if not running:
                return
            ready, _ = self._ray.wait(list(running), num_returns=1)
            actor, key = running.pop(ready[0])
            take(key, self._get(ready[0]))
            free.append(actor)

    def _get(self, refs: Any) -> Any:
        return _get(self._ray, refs)


def _get(ray: Any, refs: Any) -> Any:
    """``ray.get``, with a worker's failure turned into the error it raised (an
    :class:`~llm_flow.errors.LlmFlowError` as it is, anything else as a
    :class:`~llm_flow.errors.DistributedError` naming it)."""
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LlmFlowError):
            raise cause from None
        what = f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(exc)
        raise DistributedError(f"a Ray worker failed: {what}") from None
    except RayError as exc:  # the worker died: out of memory, killed, its node lost
        raise DistributedError(f"a Ray worker died: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DistributedError(f"running on Ray needs the ray package: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """A ``HOST[:PORT]`` address must accept connections: Ray itself would retry for minutes."""
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    try:
        with socket.create_connection((host, int(port or RAY_PORT)), CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DistributedError(
            f"cannot connect to the Ray cluster at {address}: {reason}; start one with "
            f"`ray start --head` there, or leave out the address for a local cluster"
        ) from None


def connect(address: str = LOCAL) -> tuple[Any, bool]:
    """``(ray, started)``: the ``ray`` module connected to the cluster at ``address`` (
    :data:`LOCAL`: a new local cluster), and whether this call connected (so the caller
    disconnects after the job). A process already connected (``ray.init`` in a notebook or a
    test) keeps its connection."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address not in (LOCAL, "auto") and "://" not in address:
        _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}"
        ) from None
    return ray, True


def _actor_options(
    ray: Any, recipe: ModelRecipe, workers: int | None
) -> tuple[int, dict[str, float]]:
    """(workers, the resources each asks for): one GPU each for a CUDA model, else an equal
    share of the cluster's CPUs (whole CPUs where there are enough: torch uses that many
    threads)."""
    if recipe.spec.device_map is not None:
        raise DistributedError(
            f"model {recipe.spec.name!r} is split over several devices (a device map); Ray "
            "workers hold one model each on one device: run it without Ray"
        )
    resources = ray.cluster_resources()
    if recipe.gpu:
        gpus = int(resources.get("GPU", 0))
        n = gpus if workers is None else workers
        if gpus < 1 or n > gpus:
            raise DistributedError(
                f"{n or 1} GPU worker(s) asked for, but the Ray cluster has {gpus} GPU(s); "
                "pass fewer workers, or leave out the CUDA device to run on CPUs"
            )
        return n, {"num_gpus": 1}
    n = DEFAULT_CPU_WORKERS if workers is None else workers
    cpus = float(resources.get("CPU", 1))
    share = cpus / n
    return n, {"num_cpus": math.floor(share) if share >= 1 else share}


@contextmanager
def worker_pool(recipe: ModelRecipe, options: RayOptions | None = None) -> Iterator[WorkerPool]:
    """Start ``options.workers`` actors on the cluster at ``options.address``, wait until each
    holds the model, and stop them (and a cluster this call started) on exit."""
    options = options or RayOptions()
    if options.workers is not None:
        check_at_least("the number of workers", options.workers, 1)
    ray, started = connect(options.address)
    try:
        n, resources = _actor_options(ray, recipe, options.workers)
        actor_class = ray.remote(_Worker).options(**resources)
        actors = [actor_class.remote(recipe) for _ in range(n)]
        try:
            facts = _get(ray, [a.facts.remote() for a in actors])  # every model loaded
            yield WorkerPool(ray, actors, *facts[0])
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        if started:
            ray.shutdown()


def ray_dataset(
    recipe: ModelRecipe,
    prompts: Sequence[str],
    *,
    threshold: float,
    options: RayOptions | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """:func:`~llm_flow.analyses.dataset.dataset_frequencies` as a Ray job: the same table."""
    check_dataset(prompts, threshold)
    with worker_pool(recipe, options) as pool:
        return pool.dataset(prompts, threshold, on_prompt)


def ray_index(
    recipe: ModelRecipe,
    corpus: Corpus | str | Path | None = None,
    *,
    layers: Sequence[int] | None = None,
    window: int = DEFAULT_WINDOW,
    k: int = DEFAULT_K,
    max_tokens: int | None = None,
    options: RayOptions | None = None,
    progress: IndexProgress | None = None,
    saes: Sequence[Sae] = (),
) -> CorpusIndex:
    """:func:`~llm_flow.io.index_store.build_index` as a Ray job: the same index, saved in (or
    read from) the same cache folder."""
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    check_max_tokens(max_tokens)
    check_at_least("the window", window, 2)
    check_at_least("k", k, 1)
    with worker_pool(recipe, options) as pool:
        entries = check_saes(pool.info, saes)
        settings = index_settings(
            pool.facts, corpus, layers=layers, window=window, k=k, saes=entries
        )

        def build(stop: int | None) -> CorpusIndex:
            pieces = pool.encoded(corpus.texts())
            windows = cut_windows(pieces, pool.facts.prefix, window, stop=stop)
            return pool.index(windows, settings, progress, saes)

        return cached_index(settings, max_tokens, build)
