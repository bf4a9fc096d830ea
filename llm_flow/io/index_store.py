"""Corpus indexes on disk: a folder per index in the cache, found again by what built it.

``$LLM_FLOW_CACHE/corpus-index/<model>-<key>/`` (or the user cache dir's, as for dequantized
weights) holds:

- ``index.json``: the format version, the settings (model, model fingerprint, corpus label and
  SHA-256, window, k, layers, and the SAEs as (hook, source, fingerprint of the weights)), the
  window spans, token count, the histogram edges of every measure and the seconds the build
  took;
- ``examples.parquet``: one row per (kind, layer, unit, rank) (a latent's ``layer`` is its SAE's
  place in the settings' list): ``activation`` (the ranked measure), ``window``, ``position``,
  ``attention_away`` (heads; null otherwise);
- ``histograms.parquet``: one row per (kind, layer, unit, measure): ``counts`` (a list of
  ``len(edges) + 1`` int64 counts);
- ``windows.parquet``: ``window`` and ``token_ids`` of every window an example refers to.

``key`` is a hash of the settings, the window range and the token limit, so building the same
index twice reads it back, and a different corpus, model or setting never reads a stale one.
A folder is written under a temporary name and renamed, so a reader never sees half an index.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_flow.analyses.corpus_index import (
    EDGES,
    KINDS,
    MEASURES,
    CorpusIndex,
    IndexProgress,
    IndexSettings,
    Kind,
    TopK,
    check_layers,
    check_saes,
    index_windows,
)
from llm_flow.errors import CorpusError, IndexNotFoundError
from llm_flow.io.corpus import Corpus, open_corpus, special_prefix, token_windows
from llm_flow.models.base import TransparentLlm
from llm_flow.models.loading import cache_dir
from llm_flow.models.sae import Sae

FORMAT = 2  # 2: the first position of every window is left out
DEFAULT_WINDOW = 64
DEFAULT_K = 20


def index_root() -> Path:
    """Where corpus indexes live: ``corpus-index/`` in llm-flow's cache dir."""
    return cache_dir() / "corpus-index"


def model_key(llm: TransparentLlm) -> str:
    """A fingerprint of the model's facts (name, shapes, dtype): part of an index's key."""
    facts = {k: v for k, v in llm.info.to_dict().items() if k not in ("device", "weight_devices")}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _folder(settings: IndexSettings, max_tokens: int | None) -> Path:
    spec = json.dumps([FORMAT, asdict(settings), max_tokens], sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", settings.model).strip("-")[:40] or "model"
    return index_root() / f"{slug}-{key}"


def build_index(
    llm: TransparentLlm,
    corpus: Corpus | str | Path | None = None,
    *,
    layers: Sequence[int] | None = None,
    window: int = DEFAULT_WINDOW,
    k: int = DEFAULT_K,
    max_tokens: int | None = None,
    progress: IndexProgress | None = None,
    saes: Sequence[Sae] = (),
) -> CorpusIndex:
    """The corpus index of ``llm`` over ``corpus`` (None: the shipped corpus): read from the
    cache when this model, corpus and settings were indexed before, else built in one streamed
    pass (at most ``max_tokens`` tokens, rounded up to whole windows) and saved there. The
    units of ``layers`` (None: every layer, or none when ``saes`` are given) and the latents of
    every SAE in ``saes``."""
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    facts = ModelFacts.of(llm)
    entries = check_saes(llm.info, saes)
    settings = index_settings(facts, corpus, layers=layers, window=window, k=k, saes=entries)

    def build(stop: int | None) -> CorpusIndex:
        windows = token_windows(llm, corpus, window, stop=stop)
        return index_windows(llm, windows, settings, skip=facts.skip, progress=progress, saes=saes)

    return cached_index(settings, max_tokens, build)


@dataclass(frozen=True)
class ModelFacts:
    """What an index's settings and windows need to know of a model: what a process that does
    not hold the model (a Ray job's driver) asks a worker for."""

    name: str
    model_key: str
    n_layers: int
    prefix: tuple[int, ...]  # what the model puts in front of a prompt: every window's start

    @classmethod
    def of(cls, llm: TransparentLlm) -> ModelFacts:
        return cls(llm.info.name, model_key(llm), llm.info.n_layers, tuple(special_prefix(llm)))

    @property
    def skip(self) -> int:
        """Positions left out at the start of every window: the first (see corpus_index)."""
        return max(1, len(self.prefix))


def index_settings(
    facts: ModelFacts,
    corpus: Corpus,
    *,
    layers: Sequence[int] | None,
    window: int,
    k: int,
    saes: tuple[tuple[str, str, str], ...] = (),
) -> IndexSettings:
    """The settings of an index of the model ``facts`` describe over ``corpus``: the units of
    ``layers`` (None: every layer, or none when there are SAEs) and the latents of the SAEs of
    ``saes`` (:func:`~llm_flow.analyses.corpus_index.check_saes`'s entries)."""
    return IndexSettings(
        model=facts.name,
        model_key=facts.model_key,
        corpus=corpus.label,
        corpus_hash=corpus.content_hash(),
        window=window,
        k=k,
        layers=() if layers is None and saes else check_layers(facts.n_layers, layers),
        saes=saes,
    )


def check_max_tokens(max_tokens: int | None) -> None:
    """A token limit is None (the whole corpus) or at least 1."""
    if max_tokens is not None and max_tokens < 1:
        raise CorpusError(f"the token limit must be at least 1, got {max_tokens}")


def cached_index(
    settings: IndexSettings,
    max_tokens: int | None,
    build: Callable[[int | None], CorpusIndex],
) -> CorpusIndex:
    """The index of ``settings`` over at most ``max_tokens`` tokens: read from the cache, or
    ``build(stop)`` (the windows before number ``stop``; None: all), saved and read back."""
    check_max_tokens(max_tokens)
    folder = _folder(settings, max_tokens)
    if (folder / "index.json").is_file():
        return load_index(folder)
    stop = None if max_tokens is None else -(-max_tokens // settings.window)
    started = time.perf_counter()
    index = build(stop)
    save_index(index, folder, seconds=time.perf_counter() - started)
    return load_index(folder)


def save_index(index: CorpusIndex, folder: Path, *, seconds: float | None = None) -> None:
    """Write ``index`` as ``folder`` (see the module docstring), atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows: dict[str, list[np.ndarray]] = {c: [] for c in ("kind", "layer", "unit", "rank")}
    cols: dict[str, list[np.ndarray]] = {"activation": [], "window": [], "position": [], "away": []}
    for (kind, layer), top in sorted(index.top.items()):
        n_units, k = top.values.shape
        rows["kind"].append(np.full(n_units * k, KINDS.index(kind), np.int8))
        rows["layer"].append(np.full(n_units * k, layer, np.int32))
        rows["unit"].append(np.repeat(np.arange(n_units, dtype=np.int32), k))
        rows["rank"].append(np.tile(np.arange(k, dtype=np.int32), n_units))
        for name, array in zip(
            cols, (top.values, top.windows, top.positions, top.extra), strict=True
        ):
            cols[name].append(array.ravel())
    examples = {name: np.concatenate(parts) for name, parts in (rows | cols).items()}
    kinds = pa.array([KINDS[i] for i in examples.pop("kind")])
    away = examples.pop("away")
    table = pa.table(
        {"kind": kinds, **examples, "attention_away": pa.array(away, mask=np.isnan(away))}
    )
    pq.write_table(table, tmp / "examples.parquet")
    groups = sorted(index.histograms.items())
    lengths = np.concatenate([np.full(c.shape[0], c.shape[1]) for _, c in groups])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    counts = np.concatenate([c.ravel() for _, c in groups]).astype(np.int64)

    def key_column(part: int) -> list[Any]:
        return [key[part] for key, c in groups for _ in range(c.shape[0])]

    hist = pa.table(
        {
            "kind": pa.array(key_column(0), pa.string()),
            "layer": pa.array(key_column(1), pa.int32()),
            "unit": pa.array(
                np.concatenate([np.arange(c.shape[0]) for _, c in groups]), pa.int32()
            ),
            "measure": pa.array(key_column(2), pa.string()),
            "counts": pa.ListArray.from_arrays(pa.array(offsets), pa.array(counts)),
        }
    )
    pq.write_table(hist, tmp / "histograms.parquet")
    ids = sorted(index.windows)
    windows = pa.table(
        {
            "window": pa.array(ids, pa.int64()),
            "token_ids": pa.array([list(index.windows[w]) for w in ids], pa.list_(pa.int64())),
        }
    )
    pq.write_table(windows, tmp / "windows.parquet")
    meta = {
        "format": FORMAT,
        "settings": asdict(index.settings),
        "spans": [list(s) for s in index.spans],
        "n_windows": index.n_windows,
        "n_tokens": index.n_tokens,
        "units": index.units(),
        "edges": {m: EDGES[m].tolist() for ms in MEASURES.values() for m in ms},
        "seconds": seconds,
    }
    (tmp / "index.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_index(folder: Path) -> CorpusIndex:
    """Read an index folder written by :func:`save_index`."""
    try:
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        examples = pq.read_table(folder / "examples.parquet")
        hist = pq.read_table(folder / "histograms.parquet")
        windows = pq.read_table(folder / "windows.parquet").to_pydict()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CorpusError(f"cannot read the corpus index {folder.name!r}: {exc}") from None
    raw = meta["settings"]
    saes = tuple(tuple(entry) for entry in raw.get("saes", ()))
    settings = IndexSettings(**(raw | {"layers": tuple(raw["layers"]), "saes": saes}))
    top: dict[tuple[Kind, int], TopK] = {}
    k = settings.k
    column = {
        name: examples.column(name).to_numpy()  # nulls (attention_away) become NaN
        for name in ("activation", "window", "position", "attention_away")
    }
    for start, stop, (kind, layer) in _groups(examples, ("kind", "layer")):
        grids = [column[name][start:stop].reshape(-1, k) for name in column]
        top[kind, layer] = TopK(
            grids[0].astype(np.float32),
            grids[1].astype(np.int64),
            grids[2].astype(np.int32),
            grids[3].astype(np.float32),
        )
    histograms: dict[tuple[Kind, int, str], np.ndarray] = {}
    for start, stop, (kind, layer, measure) in _groups(hist, ("kind", "layer", "measure")):
        counts = hist.slice(start, stop - start).column("counts").combine_chunks()
        histograms[kind, layer, measure] = counts.flatten().to_numpy().reshape(stop - start, -1)
    return CorpusIndex(
        settings=settings,
        spans=tuple((int(a), int(b)) for a, b in meta["spans"]),
        n_tokens=int(meta["n_tokens"]),
        top=top,
        histograms=histograms,
        windows={
            int(w): tuple(ids)
            for w, ids in zip(windows["window"], windows["token_ids"], strict=True)
        },
        path=folder,
    )


def _groups(table: pa.Table, keys: Sequence[str]) -> list[tuple[int, int, tuple[Any, ...]]]:
    """The runs of rows with equal ``keys`` of a table written sorted by them: (start, stop,
    key values)."""
    columns = [table.column(name).to_pylist() for name in keys]
    rows = list(zip(*columns, strict=True))
    runs: list[tuple[int, int, tuple[Any, ...]]] = []
    for i, key in enumerate(rows):
        if runs and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], i + 1, key)
        else:
            runs.append((i, i + 1, key))
    return runs


def _matching(
    llm: TransparentLlm, corpus: Corpus, covers: Callable[[dict[str, Any]], bool]
) -> tuple[list[tuple[float, Path]], list[dict[str, Any]]]:
    """The saved indexes of this model and corpus whose settings ``covers`` accepts, as (time,
    folder), and the settings of all of them (accepted or not)."""
    digest, key = corpus.content_hash(), model_key(llm)
    found: list[tuple[float, Path]] = []
    seen: list[dict[str, Any]] = []
    root = index_root()
    for meta_file in root.glob("*/index.json") if root.is_dir() else []:
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        s = meta.get("settings", {})
        if meta.get("format") != FORMAT or s.get("corpus_hash") != digest:
            continue
        if s.get("model_key") != key:
            continue
        seen.append(s)
        if covers(s):
            found.append((meta_file.stat().st_mtime, meta_file.parent))
    return found, seen


def find_index(
    llm: TransparentLlm, corpus: Corpus | str | Path | None, kind: Kind, layer: int
) -> CorpusIndex:
    """The newest saved index of this model and corpus that covers ``kind`` units of
    ``layer``; :class:`IndexNotFoundError` when there is none."""
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    found, seen = _matching(llm, corpus, lambda s: layer in s.get("layers", []))
    if not found:
        covered = {n for s in seen for n in s.get("layers", [])}
        where = f" (indexed layers: {', '.join(map(str, sorted(covered)))})" if covered else ""
        raise IndexNotFoundError(
            f"no corpus index of {llm.info.name} over {corpus.label} covers layer {layer} "
            f"yet{where}"
        )
    return load_index(max(found)[1])


def find_latent_index(
    llm: TransparentLlm, corpus: Corpus | str | Path | None, sae: Sae
) -> tuple[CorpusIndex, int]:
    """The newest saved index of this model and corpus that covers the latents of ``sae`` (the
    same weights, wherever they were read from), and the SAE's place in its settings;
    :class:`IndexNotFoundError` when there is none."""
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    fingerprint = sae.fingerprint()

    def covers(s: dict[str, Any]) -> bool:
        return any(entry[2] == fingerprint for entry in s.get("saes", []))

    found, _ = _matching(llm, corpus, covers)
    if not found:
        raise IndexNotFoundError(
            f"no corpus index of {llm.info.name} over {corpus.label} covers the latents of "
            f"the SAE {sae.source or sae.hook} yet"
        )
    index = load_index(max(found)[1])
    return index, latent_slot(index, sae)


def latent_slot(index: CorpusIndex, sae: Sae) -> int:
    """The place of ``sae`` (by its weights' fingerprint) in ``index``'s settings;
    :class:`IndexNotFoundError` when the index does not cover it."""
    fingerprints = [entry[2] for entry in index.settings.saes]
    fingerprint = sae.fingerprint()
    if fingerprint not in fingerprints:
        raise IndexNotFoundError(
            f"this corpus index does not cover the latents of the SAE {sae.source or sae.hook}"
        )
    return fingerprints.index(fingerprint)
