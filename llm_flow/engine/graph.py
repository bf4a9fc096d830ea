"""The layer × token contribution graph of one prompt (Ferrando & Voita 2024, §3-4).

A :class:`FlowGraph` stores every edge weight of the information-flow graph as dense per-layer
arrays — attention edges [L, T, T], residual and FFN edges [L, T] — so thresholds and routes are
boolean masks over them, never Python loops over edges.

Edge kinds: ``attention`` (``X0_s``/``I{l-1}_s`` → ``A{l}_t``, s ≤ t), ``residual``
(``I{l-1}_t`` → ``A{l}_t`` and ``A{l}_t`` → ``I{l}_t``) and ``ffn`` (``A{l}_t`` → ``M{l}_t``
and ``M{l}_t`` → ``I{l}_t``, the same weight); node names are in :mod:`llm_flow.engine.nodes`.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class FlowGraph:
    """Dense edge weights of the full contribution graph (float32, CPU)."""

    model_name: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    attention: Tensor  # [L, T, T] c[l, t, s]; zero for s > t
    attn_residual: Tensor  # [L, T] I{l-1}_t → A{l}_t
    attn_bias: Tensor  # [L, T] share of the output bias (not an edge: no node writes it)
    ffn: Tensor  # [L, T] A{l}_t → M{l}_t → I{l}_t
    ffn_residual: Tensor  # [L, T] A{l}_t → I{l}_t

    @property
    def n_layers(self) -> int:
        return int(self.attention.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention.shape[1])

    @classmethod
    def from_layers(cls, run: ModelRun, layers: list[LayerContributions]) -> FlowGraph:
        return cls(
            model_name=run.model_name,
            tokens=run.tokens,
            token_ids=run.token_ids,
            attention=torch.stack([c.attention for c in layers]).cpu(),
            attn_residual=torch.stack([c.attn_residual for c in layers]).cpu(),
            attn_bias=torch.stack([c.attn_bias for c in layers]).cpu(),
            ffn=torch.stack([c.ffn for c in layers]).cpu(),
            ffn_residual=torch.stack([c.ffn_residual for c in layers]).cpu(),
        )


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
    return layer_contributions(**tensors, memory_budget=memory_budget)  # type: ignore[arg-type]


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
