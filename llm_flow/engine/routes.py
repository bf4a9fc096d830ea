"""Information-flow routes: threshold the graph and walk it top-down (Ferrando & Voita 2024, §3,
Algorithm 1).

Starting from the output node(s) ``I{L-1}_p``, each layer keeps the edges into active nodes
whose weight is at least τ, and the sources of kept edges become active — layer by layer, as
boolean masks over the [L, T] arrays and gathers of the active rows' stored attention edges
(:meth:`~llm_flow.engine.graph.FlowGraph.row_edges`), so the work follows the route, not T². A
threshold change only re-runs this (milliseconds); contributions are never recomputed.

With ``renormalize``, the parts of each whole that survive τ are rescaled to sum to 1 (the
output-bias share, which no node writes, is dropped).

The graph holds no attention edge below its floor ε (``FlowGraph.attention_floor``). For τ ≥ ε
no such edge could survive τ, so routes are exact; for τ < ε (e.g. :func:`full_graph` at τ = 0)
they hold every stored edge ≥ τ, and the edges below ε are absent as if pruned (renormalizing
then leaves out their tiny share, at most ``FlowGraph.attn_dropped``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm_flow.engine.graph import FlowGraph, layer_head_contributions
from llm_flow.errors import InputError
from llm_flow.models.base import ModelRun
from llm_flow.validate import check_position, check_threshold

DEFAULT_THRESHOLD = 0.04


def _edge_keys(idx: Tensor, n_tokens: int) -> Tensor:
    """One int64 per attention edge (layer, target t, source s) of ``idx`` [E, 3], increasing in
    row-major order: what sorting, searching and set operations on edges compare."""
    return (idx[:, 0] * n_tokens + idx[:, 1]) * n_tokens + idx[:, 2]


@dataclass(frozen=True)
class Route:
    """The sub-graph that reaches ``positions`` through edges of weight ≥ ``threshold``.

    Attention edges are a sparse set (``attention_idx``, row-major, with their route weights);
    masks say which [L, T] edges and nodes are on the route. Weights of route edges are the
    graph's weights times a per-whole factor (1, or 1/Σ survivors when renormalizing).
    """

    graph: FlowGraph
    threshold: float
    renormalize: bool
    positions: tuple[int, ...]
    attention_idx: Tensor  # [E, 3] int64 (layer, target t, source s): I{l-1}_s → A{l}_t
    attention_weights: Tensor  # [E] float32 their weights on the route
    attn_residual: Tensor  # [L, T] bool, I{l-1}_t → A{l}_t
    ffn: Tensor  # [L, T] bool, A{l}_t → M{l}_t → I{l}_t
    ffn_residual: Tensor  # [L, T] bool, A{l}_t → I{l}_t
    embeddings: Tensor  # [T] bool, X0_t
    after_attention: Tensor  # [L, T] bool, A{l}_t
    after_layer: Tensor  # [L, T] bool, I{l}_t
    attn_factor: Tensor  # [L, T] multiplier of the attention whole's parts (on route rows)
    ffn_factor: Tensor  # [L, T] multiplier of the FFN whole's parts (on route nodes)

    @property
    def n_edges(self) -> int:
        masks = [self.attn_residual, self.ffn, self.ffn, self.ffn_residual]
        return len(self.attention_idx) + int(sum(int(m.sum()) for m in masks))

    def attention_edges(self) -> tuple[Tensor, Tensor]:
        """Attention edges on the route: (idx [E, 3] rows of (layer, target t, source s),
        weights [E]), in row-major order."""
        return self.attention_idx, self.attention_weights

    def _find(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(on the route [Q] bool, position in ``attention_idx`` [Q]) of the edges ``idx``."""
        keys = _edge_keys(self.attention_idx, self.graph.n_tokens)
        if not len(keys):
            return torch.zeros(len(idx), dtype=torch.bool), torch.zeros(len(idx), dtype=torch.long)
        wanted = _edge_keys(idx, self.graph.n_tokens)
        at = torch.searchsorted(keys, wanted).clamp_max(len(keys) - 1)
        return keys[at] == wanted, at

    def contains(self, idx: Tensor) -> Tensor:
        """[Q] bool: which attention edges of ``idx`` [Q, 3] (layer, t, s) are on the route."""
        return self._find(idx)[0]

    def attention_weights_at(self, idx: Tensor) -> Tensor:
        """[Q] route weights of the attention edges ``idx`` [Q, 3]; 0 for edges not on it."""
        found, at = self._find(idx)
        return torch.where(found, self.attention_weights[at], 0.0)

    @property
    def attn_residual_weights(self) -> Tensor:
        """[L, T] weights of the I{l-1}_t → A{l}_t edges (0 off the route)."""
        g = self.graph
        return torch.where(self.attn_residual, g.attn_residual * self.attn_factor, 0.0)

    @property
    def ffn_weights(self) -> Tensor:
        """[L, T] weights of the FFN edges (0 off the route)."""
        return torch.where(self.ffn, self.graph.ffn * self.ffn_factor, 0.0)

    @property
    def ffn_residual_weights(self) -> Tensor:
        """[L, T] weights of the A{l}_t → I{l}_t edges (0 off the route)."""
        return torch.where(self.ffn_residual, self.graph.ffn_residual * self.ffn_factor, 0.0)


def _inverse(total: Tensor) -> Tensor:
    """1/total where positive, 0 where nothing survived."""
    return torch.where(total > 0, 1 / total.clamp_min(1e-30), 0.0)


def find_route(
    graph: FlowGraph,
    positions: Sequence[int],
    threshold: float = DEFAULT_THRESHOLD,
    renormalize: bool = True,
) -> Route:
    """The route to the output nodes at ``positions`` (negative indices count from the end).

    Work per layer is proportional to the stored attention edges of the route's attention
    nodes, not to T²: only their rows are gathered, thresholded and renormalized.
    """
    n_layers, n_tokens = graph.n_layers, graph.n_tokens
    check_threshold(threshold)
    if not positions:
        raise InputError("a route needs at least one output position")
    outputs = [check_position(p, n_tokens) for p in positions]
    # Kept = at or above τ on the original scale (renormalizing must not revive pruned edges).
    keep_attn_res = graph.attn_residual >= threshold
    keep_ffn = graph.ffn >= threshold
    keep_ffn_res = graph.ffn_residual >= threshold
    ffn_factor = _inverse(graph.ffn * keep_ffn + graph.ffn_residual * keep_ffn_res)
    if not renormalize:
        ffn_factor = torch.ones_like(ffn_factor)
    attn_factor = torch.ones(n_layers, n_tokens)

    edges: list[Tensor] = []  # per layer, top-down: [E_l, 3] (layer, t, s)
    weights: list[Tensor] = []
    attn_residual = torch.zeros(n_layers, n_tokens, dtype=torch.bool)
    ffn = torch.zeros_like(attn_residual)
    ffn_residual = torch.zeros_like(attn_residual)
    after_attention = torch.zeros_like(attn_residual)
    after_layer = torch.zeros_like(attn_residual)

    active = torch.zeros(n_tokens, dtype=torch.bool)  # I{l}_t on the route
    active[outputs] = True
    for layer in range(n_layers - 1, -1, -1):
        after_layer[layer] = active
        ffn[layer] = active & keep_ffn[layer]
        ffn_residual[layer] = active & keep_ffn_res[layer]
        attn_node = ffn[layer] | ffn_residual[layer]
        after_attention[layer] = attn_node
        rows = attn_node.nonzero().flatten()
        row, edge = graph.row_edges(layer, rows)
        kept = graph.attn_weights[edge] >= threshold
        row, edge = row[kept], edge[kept]
        weight = graph.attn_weights[edge]
        sources = graph.attn_sources[edge].long()
        attn_residual[layer] = attn_node & keep_attn_res[layer]
        if renormalize:
            residual = graph.attn_residual[layer, rows] * keep_attn_res[layer, rows]
            total = torch.zeros(len(rows)).index_add_(0, row, weight) + residual
            attn_factor[layer, rows] = _inverse(total)
            weight = weight * attn_factor[layer, rows][row]
        edges.append(torch.stack([torch.full_like(sources, layer), rows[row], sources], 1))
        weights.append(weight)
        active = attn_residual[layer].clone()
        active[sources] = True
    return Route(
        graph=graph,
        threshold=threshold,
        renormalize=renormalize,
        positions=tuple(outputs),
        attention_idx=torch.cat(edges[::-1]),
        attention_weights=torch.cat(weights[::-1]),
        attn_residual=attn_residual,
        ffn=ffn,
        ffn_residual=ffn_residual,
        embeddings=active,
        after_attention=after_attention,
        after_layer=after_layer,
        attn_factor=attn_factor,
        ffn_factor=ffn_factor,
    )


def full_graph(graph: FlowGraph) -> Route:
    """Every stored edge, unpruned and unnormalized: the route to all positions at τ = 0 (every
    causal edge when the graph's attention floor is 0; attention edges below it are absent)."""
    return find_route(graph, list(range(graph.n_tokens)), threshold=0.0, renormalize=False)


def route_head_weights(run: ModelRun, route: Route) -> tuple[Tensor, Tensor]:
    """Per-head contribution of every attention edge on ``route``: (idx [E, 3] rows of
    (layer, target t, source s) in row-major order, as :meth:`Route.attention_edges` gives
    them; weights [E, H] on the CPU).

    Normalized LLM-TT's way over every (source, head) part and the residual
    (:func:`~llm_flow.engine.graph.layer_head_contributions`), computed for the route's query
    rows only; Σ_h is not the token-level edge weight. Patterns the run dropped are recomputed
    for those rows in one pass.
    """
    idx = route.attention_idx  # [E, 3]
    weights = torch.zeros(len(idx), run.layers[0].values.shape[1])
    layers = idx[:, 0].unique().tolist()
    run = run.with_attention({layer: idx[idx[:, 0] == layer, 1] for layer in layers})
    for layer in layers:
        sel = (idx[:, 0] == layer).nonzero().flatten()
        rows, inverse = idx[sel, 1].unique(return_inverse=True)
        device = run.layers[layer].values.device
        heads, _ = layer_head_contributions(run.layers[layer], rows.to(device))  # [R, S, H]
        weights[sel] = heads.cpu()[inverse, idx[sel, 2]]
    return idx, weights
