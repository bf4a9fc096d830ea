"""The layer × token contribution graph of one prompt (Ferrando & Voita 2024, §3-4).

A :class:`FlowGraph` stores the residual and FFN edge weights as dense [L, T] arrays and the
attention edges sparsely: every edge of weight ≥ a floor ε (:data:`ATTENTION_FLOOR`) in CSR
rows, one row per (layer l, query t), plus each row's dropped share (Σ of its edges below ε), so

    Σ_s stored c[l, t, s] + dropped[l, t] + attn_residual[l, t] + attn_bias[l, t] = 1

(+ ffn[l, t] for parallel attention + MLP blocks) still holds. Dense [L, T, T] edges are 2 GB at
4096 tokens × 32 layers and 34 GB at 16k; most of them are tiny, and a route at τ ≥ ε never
uses one below ε, so routes stay exact while memory grows with the edges kept, about linearly in
T. Each layer is sparsified as soon as its contributions are computed (:func:`sparse_layer`),
so one dense [T, T] layer is alive at a time.

Edge kinds: ``attention`` (``X0_s``/``I{l-1}_s`` → ``A{l}_t``, s ≤ t), ``residual``
(``I{l-1}_t`` → ``A{l}_t`` and ``A{l}_t`` → ``I{l}_t``) and ``ffn`` (``A{l}_t`` → ``M{l}_t``
and ``M{l}_t`` → ``I{l}_t``, the same weight); node names are in :mod:`llm_flow.engine.nodes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm_flow.engine.contributions import (
    LayerContributions,
    head_contributions,
    layer_contributions,
    normalize,
    proximity,
)
from llm_flow.models.base import LayerRun, ModelRun
from llm_flow.validate import check_attention_floor

# Attention edges below it are not stored: far below any useful τ (the default is 0.04), and a
# row keeps at most Σ c / ε ≤ 10⁴ of them however long the prompt.
ATTENTION_FLOOR = 1e-4


def exact_floor(threshold: float) -> float:
    """The attention floor that keeps routes at ``threshold`` exact: ε, or τ when smaller (τ = 0
    stores every edge). For callers that know τ before tracing (a command, a dataset pass)."""
    return min(ATTENTION_FLOOR, threshold)


@dataclass(frozen=True)
class SparseLayer:
    """One layer's contributions with its attention edges ≥ ``floor`` in CSR rows (CPU)."""

    floor: float
    counts: Tensor  # [T] int64 stored edges of each query row
    sources: Tensor  # [n] int32 source s of each stored edge, ascending within a row
    weights: Tensor  # [n] float32 c[t, s] ≥ floor
    dropped: Tensor  # [T] Σ of the row's weights below the floor
    attn_residual: Tensor  # [T]
    attn_bias: Tensor  # [T]
    ffn: Tensor  # [T]
    ffn_residual: Tensor  # [T]


def sparse_layer(c: LayerContributions, floor: float = ATTENTION_FLOOR) -> SparseLayer:
    """``c`` with every causal attention edge of weight ≥ ``floor`` kept (all of them at 0) and
    the rest summed per row; the dense [T, T] is sparsified where it was computed."""
    check_attention_floor(floor)
    if c.attention.device.type == "cpu":
        from llm_flow.engine.kernels import edge_rows_cpu

        counts, sources, weights, dropped = edge_rows_cpu(c.attention.float(), floor)
    else:
        counts, sources, weights, dropped = _edge_rows(c.attention, floor)
    return SparseLayer(
        floor=floor,
        counts=counts,
        sources=sources,
        weights=weights,
        dropped=dropped,
        attn_residual=c.attn_residual.cpu(),
        attn_bias=c.attn_bias.cpu(),
        ffn=c.ffn.cpu(),
        ffn_residual=c.ffn_residual.cpu(),
    )


def _edge_rows(attention: Tensor, floor: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~llm_flow.engine.kernels.edge_rows_cpu` in torch, where the edges were computed
    (a GPU): only the kept edges travel to the CPU."""
    keep = (attention >= floor).tril_()  # causal also at floor 0
    # Row-major. The weights are gathered at these indices: indexing by the mask would search
    # the [T, T] mask for them a second time.
    rows, sources = keep.nonzero(as_tuple=True)
    return (
        keep.sum(1).cpu(),
        sources.to(torch.int32).cpu(),
        attention[rows, sources].cpu(),
        torch.where(keep, 0.0, attention).sum(1).cpu(),
    )


@dataclass(frozen=True)
class FlowGraph:
    """Edge weights of the full contribution graph (float32, CPU); attention edges below
    ``attention_floor`` are absent (their sum per row is ``attn_dropped``)."""

    model_name: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    attention_floor: float
    attn_offsets: Tensor  # [L·T + 1] int64: row (l, t) holds edges offsets[l·T + t] up to the next
    attn_sources: Tensor  # [N] int32 source s of each stored edge, ascending within a row
    attn_weights: Tensor  # [N] float32 c[l, t, s] ≥ attention_floor
    attn_dropped: Tensor  # [L, T] Σ of the weights of row (l, t) below attention_floor
    attn_residual: Tensor  # [L, T] I{l-1}_t → A{l}_t
    attn_bias: Tensor  # [L, T] share of the output bias (not an edge: no node writes it)
    ffn: Tensor  # [L, T] A{l}_t → M{l}_t → I{l}_t
    ffn_residual: Tensor  # [L, T] A{l}_t → I{l}_t

    @property
    def n_layers(self) -> int:
        return int(self.attn_residual.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attn_residual.shape[1])

    @classmethod
    def from_layers(cls, run: ModelRun, layers: Sequence[SparseLayer]) -> FlowGraph:
        counts = torch.cat([layer.counts for layer in layers])  # [L·T]
        return cls(
            model_name=run.model_name,
            tokens=run.tokens,
            token_ids=run.token_ids,
            attention_floor=layers[0].floor,
            attn_offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            attn_sources=torch.cat([layer.sources for layer in layers]),
            attn_weights=torch.cat([layer.weights for layer in layers]),
            attn_dropped=torch.stack([layer.dropped for layer in layers]),
            attn_residual=torch.stack([layer.attn_residual for layer in layers]),
            attn_bias=torch.stack([layer.attn_bias for layer in layers]),
            ffn=torch.stack([layer.ffn for layer in layers]),
            ffn_residual=torch.stack([layer.ffn_residual for layer in layers]),
        )

    def row_edges(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The stored attention edges into ``A{layer}_t`` for t in ``rows`` [R], row after row:
        (row [n], the index into ``rows`` of each edge's target; edge [n], its index into
        ``attn_sources`` / ``attn_weights``). Work is proportional to the edges gathered."""
        start = self.attn_offsets[layer * self.n_tokens + rows]  # [R]
        counts = self.attn_offsets[layer * self.n_tokens + rows + 1] - start
        row = torch.repeat_interleave(torch.arange(len(rows)), counts)  # [n]
        first = counts.cumsum(0) - counts  # where each row's edges begin in the output
        edge = torch.arange(len(row)) - first[row] + start[row]
        return row, edge

    def attention_rows(self, layer: int, rows: Tensor | None = None) -> Tensor:
        """Dense [R, T] attention weights into ``A{layer}_t`` for t in ``rows`` (all rows when
        None: [T, T]); 0 where no edge is stored."""
        rows = torch.arange(self.n_tokens) if rows is None else rows
        row, edge = self.row_edges(layer, rows)
        out = torch.zeros(len(rows), self.n_tokens)
        out[row, self.attn_sources[edge].long()] = self.attn_weights[edge]
        return out

    def attention_at(
        self, layer: Tensor | int, target: Tensor | int, source: Tensor | int
    ) -> Tensor:
        """c[l, t, s] for broadcastable indices; 0 where no edge is stored (below the floor, or
        s > t). A vectorized binary search in each edge's row."""
        ls, ts, ss = torch.broadcast_tensors(
            *(torch.as_tensor(i, dtype=torch.long) for i in (layer, target, source))
        )
        row = ls * self.n_tokens + ts
        lo, end = self.attn_offsets[row], self.attn_offsets[row + 1]
        hi, n_edges = end, len(self.attn_sources)
        if n_edges == 0:
            return torch.zeros(row.shape)
        for _ in range(self.n_tokens.bit_length()):  # a row holds at most T edges
            mid = (lo + hi) // 2
            below = self.attn_sources[mid.clamp_max(n_edges - 1)] < ss
            searching = lo < hi
            lo = torch.where(searching & below, mid + 1, lo)
            hi = torch.where(searching & ~below, mid, hi)
        at = lo.clamp_max(n_edges - 1)
        found = (lo < end) & (self.attn_sources[at] == ss)
        return torch.where(found, self.attn_weights[at], 0.0)

    def dense_attention(self) -> Tensor:
        """[L, T, T] every attention weight, 0 where none is stored (small prompts, tests)."""
        return torch.stack([self.attention_rows(layer) for layer in range(self.n_layers)])


def _attention_sum(layer: LayerRun, pattern: Tensor) -> dict[str, Tensor | None]:
    """The tensors of a layer's attention sum, as the contribution functions take them."""
    return {
        "resid_pre": layer.resid_pre,
        "resid_mid": layer.resid_mid,
        "resid_post": layer.resid_post,
        "mlp_update": layer.mlp_update,
        "pattern": pattern,
        "head_outputs": layer.head_outputs(),
        "attn_scale": layer.attn_scale,
        "attn_bias": layer.b_O,
    }


def contributions_of(layer: LayerRun, *, memory_budget: int | None = None) -> LayerContributions:
    """Token-level contributions of one layer of a run (needs the layer's whole pattern)."""
    if layer.pattern is None or layer.pattern_rows is not None:
        raise ValueError(
            f"layer {layer.index} holds no attention pattern of every row; run with patterns"
        )
    tensors = _attention_sum(layer, layer.pattern)
    factors = (layer.values, layer.W_O)  # W_O stays on its layer's device until used
    return layer_contributions(**tensors, head_factors=factors, memory_budget=memory_budget)  # type: ignore[arg-type]


def layer_head_contributions(
    layer: LayerRun, rows: Tensor, *, memory_budget: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-head contributions of ``layer`` for query ``rows`` → (heads [R, S, H], residual [R]);
    the layer must hold its pattern at those rows (see ``ModelRun.with_attention``).

    Normalized over every (source, head) part + residual + bias, as LLM-TT does; note that
    Σ_h differs from the token-level edge weight of :class:`FlowGraph`.
    """
    tensors = _attention_sum(layer, layer.attention_at(rows))
    return head_contributions(**tensors, rows=rows, memory_budget=memory_budget)  # type: ignore[arg-type]


def layer_expert_contributions(layer: LayerRun, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-expert contributions of a mixture-of-experts layer at ``rows`` [R] to the residual
    after its FFN → (experts [R, E + 1], residual [R]); the last expert column is the shared
    expert (0 without one).

    The parts of ``resid_post[t]`` are each routed expert's part ``g_e(t) · E_e(x_t)``, the
    shared expert's, the FFN bias and the residual the FFN wrote into, normalized together —
    as the neurons of a dense FFN are. Experts not routed to at t get 0.
    """
    ex = layer.experts
    if ex is None:
        raise ValueError(f"layer {layer.index} has a dense FFN, not experts")
    scale = layer.mlp_scale[rows].float()[:, None, None]
    slots = ex.slot_outputs(rows=rows)  # [R, k, D]
    shared = ex.shared_output(rows=rows)
    shared_part = torch.zeros_like(slots[:, :1]) if shared is None else shared[:, None]
    bias = layer.b_out.expand_as(layer.resid_pre)[rows].float()[:, None]
    base = layer.mlp_base[rows].float()[:, None]
    parts = torch.cat([slots * scale, shared_part * scale, bias * scale, base], 1)
    share = normalize(proximity(layer.resid_post[rows].float(), parts))  # [R, k + 3]
    n_slots = slots.shape[1]
    experts = torch.zeros(len(rows), ex.n_experts + 1, dtype=share.dtype, device=share.device)
    experts.scatter_add_(1, ex.index[rows].long(), share[:, :n_slots])
    experts[:, -1] = share[:, n_slots]
    return experts, share[:, -1]
