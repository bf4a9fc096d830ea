"""Flow graphs from dense arrays (hand-made or random), built through the engine's own
sparsification, and a dense reference route walk written from the definition."""

from __future__ import annotations

import torch

from llm_flow.engine.contributions import LayerContributions
from llm_flow.engine.graph import FlowGraph, sparse_layer
from llm_flow.models.base import ModelRun


def dense_graph(
    attention: torch.Tensor,
    attn_residual: torch.Tensor,
    ffn: torch.Tensor,
    *,
    attn_bias: torch.Tensor | None = None,
    floor: float = 0.0,
    name: str = "hand",
) -> FlowGraph:
    """The graph of dense [L, T, T] attention and [L, T] weights, keeping edges ≥ ``floor``
    (every causal edge at 0); ``attn_bias`` defaults to what makes each row sum to 1."""
    n_layers, n_tokens = attn_residual.shape
    if attn_bias is None:
        attn_bias = 1 - attention.sum(-1) - attn_residual
    layers = [
        sparse_layer(
            LayerContributions(attention[i], attn_residual[i], attn_bias[i], ffn[i], 1 - ffn[i]),
            floor,
        )
        for i in range(n_layers)
    ]
    tokens = tuple(f"t{i}" for i in range(n_tokens))
    run = ModelRun(
        name, tuple(range(n_tokens)), tokens, torch.zeros(n_tokens, 1), (), torch.ones(n_tokens)
    )
    return FlowGraph.from_layers(run, layers)


def random_weights(
    n_layers: int = 4, n_tokens: int = 7, seed: int = 0, power: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random normalized contributions with the engine's structure (causal, each attention
    row + its residual sums to 1; a higher ``power`` gives more tiny edges): (attention
    [L, T, T], attn_residual [L, T], ffn [L, T])."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(n_layers, n_tokens, n_tokens + 1, generator=gen) ** power
    raw[:, :, :n_tokens] *= torch.ones(n_tokens, n_tokens).tril()
    c = raw / raw.sum(-1, keepdim=True)
    ffn = torch.rand(n_layers, n_tokens, generator=gen)
    return c[:, :, :n_tokens].contiguous(), c[:, :, n_tokens].contiguous(), ffn


def random_graph(
    n_layers: int = 4, n_tokens: int = 7, seed: int = 0, *, floor: float = 0.0
) -> FlowGraph:
    attention, attn_residual, ffn = random_weights(n_layers, n_tokens, seed)
    bias = torch.zeros(n_layers, n_tokens)
    return dense_graph(attention, attn_residual, ffn, attn_bias=bias, floor=floor, name="random")


def dense_route(
    attention: torch.Tensor,
    attn_residual: torch.Tensor,
    ffn: torch.Tensor,
    positions: list[int],
    tau: float,
    renormalize: bool,
) -> dict[tuple[str, int, int, int], float]:
    """Reference: the route's edges → weights, walked top-down one node at a time over the dense
    weights. Keys: ("attention", l, t, s), ("attn_residual" | "ffn" | "ffn_residual", l, t, 0).
    An edge is kept when its weight ≥ τ and its target is on the route; renormalizing divides
    each whole's kept parts by their sum."""
    n_layers, n_tokens = attn_residual.shape
    ffn_residual = 1 - ffn
    edges: dict[tuple[str, int, int, int], float] = {}
    active = {p % n_tokens for p in positions}  # I{l}_t on the route
    for layer in range(n_layers - 1, -1, -1):
        below: set[int] = set()
        for t in sorted(active):
            parts = {("ffn", layer, t, 0): float(ffn[layer, t])}
            parts[("ffn_residual", layer, t, 0)] = float(ffn_residual[layer, t])
            kept = {k: w for k, w in parts.items() if w >= tau}
            edges |= _scaled(kept, renormalize)
            if not kept:
                continue  # A{l}_t is not on the route
            parts = {("attn_residual", layer, t, 0): float(attn_residual[layer, t])}
            for s in range(t + 1):
                parts[("attention", layer, t, s)] = float(attention[layer, t, s])
            kept = {k: w for k, w in parts.items() if w >= tau}
            edges |= _scaled(kept, renormalize)
            below |= {t if k[0] == "attn_residual" else k[3] for k in kept}
        active = below
    return edges


def _scaled(kept: dict[tuple[str, int, int, int], float], renormalize: bool) -> dict:
    total = sum(kept.values())
    if not renormalize:
        return kept
    return {k: (w / total if total > 0 else 0.0) for k, w in kept.items()}
