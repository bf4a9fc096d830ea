"""The corpus index: each unit's top activating examples over a corpus, and its histogram.

OpenAI's Transformer Debugger (TDB) shows, for a neuron, the dataset examples it fires on most;
this index does that for neurons, attention heads and routed experts, in one streamed pass over
fixed-length token windows (see :mod:`llm_flow.io.corpus`):

- **neuron** ``L.N`` of a dense FFN: its post-activation value ``neuron_acts[t, n]`` (gated MLPs:
  ``act(gate) · up``), sign kept; ranked by the value.
- **head** ``L.H``: the norm of what it writes at t, ``‖attn_scale[t] · Σ_s A[h, t, s] ·
  v[s, h] W_O[h]‖₂`` (``output_norm``, what it is ranked by), and its attention away from the
  first token, ``1 − A[h, t, 0]`` (``attention_away``), kept with every example.
- **expert** ``L.E`` of a mixture-of-experts layer: its router weight ``g_e(t)`` (0 where it was
  not chosen); ranked by it.
- **latent** ``HOOK:I`` of a sparse autoencoder on a residual hook (:mod:`llm_flow.models.sae`):
  its activation ``f_i`` of the residual there; ranked by it. The index's settings name each SAE
  by hook, source and weights' fingerprint (:attr:`IndexSettings.saes`), and its units are keyed
  ``("latent", n)`` with n the SAE's place in that list, where other kinds have their layer.

The first position of every window is left out. With a prepended BOS it is the same token in
every window, so it would fill a unit's examples with copies of one context; without one (the
packaged SmolLM2 prepends none) the model reads that token with no context at all, and as the
attention sink many units take values there that they take nowhere else.

Per unit the index keeps the top k samples, ordered by (value descending, window, position): a
strict total order, so the top k of a set of windows is unique whatever batches it was computed
in. The histograms use fixed edges that do not depend on the data (:data:`EDGES`): a symmetric
log grid (8 bins per decade from 1e-4 to 1e3 on each side of 0) for activations and output
norms, 50 equal bins of [0, 1] for shares and router weights; bin i counts ``edges[i-1] ≤ x <
edges[i]`` (the first and last bins hold everything below / at or above the ends). So
:func:`merge` — top k of the union, histograms added — is exact, and the in-process pass builds
its index by merging the index of each batch of windows the same way (what lets the job be split
over workers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from llm_flow.errors import CorpusError
from llm_flow.models.base import LayerRun, ModelInfo, TransparentLlm
from llm_flow.models.sae import Sae, parse_hook
from llm_flow.validate import check_at_least

Kind = Literal["neuron", "head", "expert", "latent"]
KINDS: tuple[Kind, ...] = ("neuron", "head", "expert", "latent")
RANKED: dict[Kind, str] = {
    "neuron": "activation",
    "head": "output_norm",
    "expert": "router_weight",
    "latent": "activation",
}
MEASURES: dict[Kind, tuple[str, ...]] = {
    "neuron": ("activation",),
    "head": ("output_norm", "attention_away"),
    "expert": ("router_weight",),
    "latent": ("activation",),
}
_DECADES = np.logspace(-4, 3, 57, dtype=np.float64)  # 8 bins per decade
SIGNED_EDGES = np.concatenate([-_DECADES[::-1], _DECADES]).astype(np.float32)
UNIT_EDGES = np.linspace(0.0, 1.0, 51, dtype=np.float64).astype(np.float32)
EDGES: dict[str, np.ndarray] = {
    "activation": SIGNED_EDGES,
    "output_norm": SIGNED_EDGES,
    "attention_away": UNIT_EDGES,
    "router_weight": UNIT_EDGES,
}
BATCH_WINDOWS = 16  # windows reduced together before merging into the running index

# (windows done, tokens done) after each batch
IndexProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class TopK:
    """The top k samples of each unit of one (kind, layer), best first: value, window number,
    position in the window and, for heads, the attention away share there. Empty slots (fewer
    than k samples seen) hold value −inf and window −1."""

    values: np.ndarray  # [U, k] float32
    windows: np.ndarray  # [U, k] int64
    positions: np.ndarray  # [U, k] int32
    extra: np.ndarray  # [U, k] float32: heads' attention_away, NaN for other kinds

    @property
    def k(self) -> int:
        return int(self.values.shape[1])


@dataclass(frozen=True)
class IndexSettings:
    """What an index was built from: two indexes merge only when these agree."""

    model: str  # the model's name
    model_key: str  # a fingerprint of the model's facts (shapes, dtype)
    corpus: str  # the corpus's label
    corpus_hash: str
    window: int
    k: int
    layers: tuple[int, ...]
    saes: tuple[tuple[str, str, str], ...] = ()  # (hook, source, fingerprint) of each SAE


def sae_entry(sae: Sae) -> tuple[str, str, str]:
    """How an index's settings name ``sae``: (hook, source, fingerprint of its weights)."""
    if sae.hook is None:
        raise CorpusError(f"{sae.source}: the SAE names no hook; load it with hook=…")
    return sae.hook, sae.source, sae.fingerprint()


@dataclass(frozen=True, eq=False)
class CorpusIndex:
    """Top-k examples and histograms of every unit of ``settings.layers`` over the windows
    ``spans`` (half-open ranges of window numbers) of a corpus."""

    settings: IndexSettings
    spans: tuple[tuple[int, int], ...]
    n_tokens: int  # positions the units were read at (each window's first left out)
    top: Mapping[tuple[Kind, int], TopK]
    histograms: Mapping[tuple[Kind, int, str], np.ndarray]  # [U, len(edges) + 1] int64
    windows: Mapping[int, tuple[int, ...]]  # the token ids of every window an example is in
    path: Path | None = None  # the folder it was read from

    @property
    def n_windows(self) -> int:
        return sum(b - a for a, b in self.spans)

    def units(self) -> dict[Kind, int]:
        """How many units of each kind the index holds."""
        counts = dict.fromkeys(KINDS, 0)
        for (kind, _), top in self.top.items():
            counts[kind] += top.values.shape[0]
        return counts


def _empty(n_units: int, k: int) -> TopK:
    return TopK(
        values=np.full((n_units, k), -np.inf, np.float32),
        windows=np.full((n_units, k), -1, np.int64),
        positions=np.full((n_units, k), -1, np.int32),
        extra=np.full((n_units, k), np.nan, np.float32),
    )


def merge_topk(a: TopK, b: TopK, k: int) -> TopK:
    """The top k of the union of two sample sets, in the index's total order."""
    values = np.concatenate([a.values, b.values], axis=1)
    windows = np.concatenate([a.windows, b.windows], axis=1)
    positions = np.concatenate([a.positions, b.positions], axis=1)
    extra = np.concatenate([a.extra, b.extra], axis=1)
    # lexsort: the last key is the primary one; empty slots (−inf) sort last.
    order = np.lexsort((positions, windows, -values), axis=-1)[:, :k]

    def take(x: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, order, axis=1)

    return TopK(take(values), take(windows), take(positions), take(extra))


def batch_topk(
    values: Tensor, windows: Tensor, positions: Tensor, extra: Tensor | None, k: int
) -> TopK:
    """The top k of each unit's samples ``values`` [N, U] (rows in (window, position) order),
    ties broken by row: torch's topk, with the rows where ties straddle the k-th value re-ranked
    by a stable sort."""
    cols = values.T.contiguous()  # [U, N]
    kk = min(k, cols.shape[1])
    idx = cols.topk(kk, dim=1).indices  # [U, kk]
    kth = cols.gather(1, idx[:, -1:])
    tied = ((cols >= kth).sum(1) > kk).nonzero().flatten()
    if len(tied):
        idx[tied] = cols[tied].sort(dim=1, descending=True, stable=True).indices[:, :kk]
    idx = idx.sort(dim=1).values  # row order first, so the stable sort breaks ties by row
    idx = idx.gather(1, cols.gather(1, idx).sort(dim=1, descending=True, stable=True).indices)
    out = _empty(cols.shape[0], k)
    out.values[:, :kk] = cols.gather(1, idx).numpy()
    out.windows[:, :kk] = windows[idx].numpy()
    out.positions[:, :kk] = positions[idx].numpy()
    if extra is not None:
        out.extra[:, :kk] = extra.T.gather(1, idx).numpy()
    return out


def histogram(values: Tensor, measure: str) -> np.ndarray:
    """Counts per unit of ``values`` [N, U] in the fixed bins of ``measure`` → [U, n_bins]."""
    edges = torch.from_numpy(EDGES[measure])
    n_bins = len(edges) + 1
    bins = torch.bucketize(values.T.contiguous(), edges, right=True)  # [U, N]
    flat = bins + torch.arange(values.shape[1])[:, None] * n_bins
    counts = torch.bincount(flat.flatten(), minlength=values.shape[1] * n_bins)
    return counts.view(values.shape[1], n_bins).numpy().astype(np.int64)


def unit_samples(layer: LayerRun, kinds: Sequence[Kind], start: int) -> dict[Kind, list[Tensor]]:
    """Each kind's per-token measures of one layer from position ``start`` on, float32 on the
    CPU: neuron [activation], head [output_norm, attention_away], expert [router_weight], each
    [T − start, U]. Kinds the layer lacks (neurons of an MoE layer) are left out."""
    out: dict[Kind, list[Tensor]] = {}
    f32 = torch.float32
    if "neuron" in kinds and layer.experts is None and layer.neuron_acts.shape[1]:
        out["neuron"] = [layer.neuron_acts[start:].to(f32).cpu()]
    if "head" in kinds and layer.pattern is not None:
        pattern = layer.pattern[:, start:].to(f32)  # [H, T', S]
        mixed = torch.einsum("hts,shk->thk", pattern, layer.values.to(f32))  # [T', H, d_head]
        W_O = layer.W_O.to(device=mixed.device, dtype=f32)  # [H, d_head, D]
        written = torch.einsum("thk,hkd->thd", mixed, W_O) * layer.attn_scale[start:, None, None]
        away = 1 - pattern[:, :, 0].T  # [T', H]
        out["head"] = [written.to(f32).norm(dim=-1).cpu(), away.cpu()]
    if "expert" in kinds and layer.experts is not None:
        ex = layer.experts
        dense = torch.zeros(ex.index.shape[0], ex.n_experts, dtype=f32, device=ex.index.device)
        dense.scatter_(1, ex.index.long(), ex.weight.to(f32))  # [T, E]
        out["expert"] = [dense[start:].cpu()]
    return out


def hook_states(layer: LayerRun, hook: str) -> Tensor:
    """The residual states [T, D] layer ``layer``'s ``hook`` (``blocks.{l}.hook_resid_pre``,
    ``_mid`` or ``_post``) holds; parallel blocks have no middle state, and there ``_mid`` is
    what attention alone wrote (as for the node ``A{l}``)."""
    which = parse_hook(hook)[1]
    if which == "pre":
        return layer.resid_pre
    if which == "post":
        return layer.resid_post
    if layer.resid_mid is None:
        return layer.resid_pre + layer.attn_update
    return layer.resid_mid


def check_saes(info: ModelInfo, saes: Sequence[Sae]) -> tuple[tuple[str, str, str], ...]:
    """Each SAE's :func:`sae_entry` once it reads a residual of the model ``info`` describes;
    :class:`CorpusError` otherwise."""
    for sae in saes:
        hook = sae_entry(sae)[0]
        if parse_hook(hook)[0] >= info.n_layers:
            raise CorpusError(f"{hook!r} is not in {info.name}: it has {info.n_layers} layers")
        if sae.d_in != info.d_model:
            raise CorpusError(
                f"{sae.source}: the SAE reads {sae.d_in}-dimensional states; "
                f"{info.name}'s are {info.d_model}"
            )
    entries = tuple(sae_entry(sae) for sae in saes)
    if len({entry[2] for entry in entries}) < len(entries):
        raise CorpusError("the same SAE is listed twice")
    return entries


class _StopPass(Exception):
    """Stops a window's forward pass after the last indexed layer."""


@dataclass
class _Batch:
    """Samples of the windows of one batch, per (kind, layer)."""

    samples: dict[tuple[Kind, int], list[list[Tensor]]]
    windows: list[Tensor]
    positions: list[Tensor]


def _reduce(
    batch: _Batch,
    settings: IndexSettings,
    span: tuple[int, int],
    ids: Mapping[int, tuple[int, ...]],
) -> CorpusIndex:
    """The index of one batch of windows (numbers ``span``, token ids ``ids``)."""
    windows = torch.cat(batch.windows)
    positions = torch.cat(batch.positions)
    top: dict[tuple[Kind, int], TopK] = {}
    histograms: dict[tuple[Kind, int, str], np.ndarray] = {}
    for (kind, layer), per_window in batch.samples.items():
        measures = [torch.cat(parts) for parts in zip(*per_window, strict=True)]
        extra = measures[1] if kind == "head" else None
        top[kind, layer] = batch_topk(measures[0], windows, positions, extra, settings.k)
        for name, values in zip(MEASURES[kind], measures, strict=True):
            histograms[kind, layer, name] = histogram(values, name)
    kept = {w: ids[w] for w in _used(top)}
    return CorpusIndex(settings, (span,), len(windows), top, histograms, kept)


def _used(top: Mapping[tuple[Kind, int], TopK]) -> list[int]:
    """The window numbers some example refers to, sorted."""
    found = np.unique(np.concatenate([t.windows.ravel() for t in top.values()]))
    return [int(w) for w in found if w >= 0]


def merge(a: CorpusIndex, b: CorpusIndex) -> CorpusIndex:
    """The index of the union of two indexes' windows: per unit the top k of both, histograms
    added. The two must come from the same model, corpus and settings and cover disjoint
    windows."""
    if a.settings != b.settings:
        raise CorpusError(
            "these indexes cannot be merged: they differ in model, corpus, window, k or layers"
        )
    spans = _join_spans(a.spans + b.spans)
    if sum(y - x for x, y in spans) != a.n_windows + b.n_windows:
        raise CorpusError("these indexes cannot be merged: they share windows")
    k = a.settings.k
    top = {key: merge_topk(a.top[key], b.top[key], k) for key in a.top}
    histograms = {key: a.histograms[key] + b.histograms[key] for key in a.histograms}
    both = {**a.windows, **b.windows}
    windows = {w: both[w] for w in _used(top)}
    return CorpusIndex(a.settings, spans, a.n_tokens + b.n_tokens, top, histograms, windows)


def _join_spans(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    joined: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if joined and lo <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(hi, joined[-1][1]))
        else:
            joined.append((lo, hi))
    return tuple(joined)


def parse_layers(text: str) -> list[int]:
    """``"0,3,5-7"`` → ``[0, 3, 5, 6, 7]``; :class:`CorpusError` showing the form."""
    layers: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise CorpusError(f"cannot read layers {text!r}; write them like 0,3,5-7")
        layers.extend(range(int(lo), int(hi or lo) + 1))
    return layers


def check_layers(n_layers: int, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The layers to index of a model of ``n_layers`` (None: all), sorted; :class:`CorpusError`
    listing the valid ones."""
    if layers is None:
        return tuple(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        what = f"layer {bad[0]} does not exist" if bad else "no layers to index"
        raise CorpusError(f"{what}; valid layers are 0..{n_layers - 1}")
    return tuple(sorted(set(layers)))


def index_windows(
    llm: TransparentLlm,
    windows: Iterable[tuple[int, Sequence[int]]],
    settings: IndexSettings,
    *,
    skip: int = 0,
    batch_windows: int = BATCH_WINDOWS,
    progress: IndexProgress | None = None,
    saes: Sequence[Sae] = (),
) -> CorpusIndex:
    """Index ``windows`` ((number, token ids), in increasing number order): one forward pass per
    window that stops after the last indexed layer (or SAE hook), positions before ``skip``
    (the first) left out, each batch of ``batch_windows`` windows reduced to its own index and
    merged into the running one. ``saes`` are the SAEs ``settings.saes`` names, in its order.
    ``progress(windows, tokens)`` after each batch."""
    check_at_least("the window", settings.window, 2)
    check_at_least("k", settings.k, 1)
    entries = tuple(sae_entry(sae) for sae in saes)
    if entries != settings.saes:
        raise CorpusError("the SAEs given are not the ones the index's settings name")
    at_layer: dict[int, list[tuple[int, str, Sae]]] = {}
    for n, ((hook, _, _), sae) in enumerate(zip(entries, saes, strict=True)):
        at_layer.setdefault(parse_hook(hook)[0], []).append((n, hook, sae))
    if not settings.layers and not saes:
        raise CorpusError("nothing to index: give layers, SAEs or both")
    last = max([*settings.layers, *at_layer])
    wanted = set(settings.layers)
    running: CorpusIndex | None = None
    batch = _Batch({}, [], [])
    ids: dict[int, tuple[int, ...]] = {}  # this batch's windows
    first = done = tokens = 0

    def flush() -> None:
        nonlocal running, batch
        if not batch.windows:
            return
        part = _reduce(batch, settings, (first, max(ids) + 1), ids)
        running = part if running is None else merge(running, part)
        batch = _Batch({}, [], [])
        ids.clear()
        if progress is not None:
            progress(done, tokens)

    def take(layer: LayerRun) -> None:
        if layer.index in wanted:
            for kind, measures in unit_samples(layer, KINDS, skip).items():
                batch.samples.setdefault((kind, layer.index), []).append(measures)
        for n, hook, sae in at_layer.get(layer.index, []):
            states = hook_states(layer, hook)[skip:].float().cpu()  # [T', D]
            batch.samples.setdefault(("latent", n), []).append([sae.encode(states)])
        if layer.index == last:
            raise _StopPass

    for number, window in windows:
        token_ids = tuple(int(i) for i in window)
        if len(token_ids) <= skip:
            continue
        if not ids:
            first = number
        with contextlib.suppress(_StopPass):  # raised once the later layers are not needed
            llm.run(token_ids, on_layer=take, keep_patterns=False)
        n = len(token_ids) - skip
        batch.windows.append(torch.full((n,), number, dtype=torch.int64))
        batch.positions.append(torch.arange(skip, len(token_ids), dtype=torch.int32))
        ids[number] = token_ids
        done += 1
        tokens += n
        if done % batch_windows == 0:
            flush()
    flush()
    if running is None:
        raise CorpusError("the corpus holds no text to index")
    return running
