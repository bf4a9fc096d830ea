"""Thresholding, renormalization and top-down route extraction."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from llm_flow.engine.edges import route_edges, route_nodes
from llm_flow.engine.graph import FlowGraph
from llm_flow.engine.nodes import node_id, source_id
from llm_flow.engine.routes import Route, find_route, full_graph
from tests.graphs import dense_graph, dense_route, random_graph, random_weights


def test_llm_tt_threshold_case() -> None:
    """Blocks [.05, .15] + residual .8 and [.05, .05] + residual .9 at τ = 0.1, renormalized:
    [0, .157894] + .842105 and [0, 0] + 1.0 (the published LLM-TT unit case)."""
    attention = torch.zeros(1, 3, 3)
    attention[0, 1, :2] = torch.tensor([0.05, 0.15])
    attention[0, 2, :2] = torch.tensor([0.05, 0.05])
    attn_residual = torch.tensor([[1.0, 0.8, 0.9]])
    g = dense_graph(attention, attn_residual, ffn=torch.full((1, 3), 0.5))
    route = find_route(g, [1, 2], threshold=0.1, renormalize=True)
    idx, weights = route.attention_edges()
    assert idx.tolist() == [[0, 1, 1]]  # only the 0.15 edge survives; row 2 keeps no edge
    # 0.15 / (0.15 + 0.8) and 0.8 / 0.95, 0.9 / 0.9: float32 of values ~1 (eps 1.2e-7)
    torch.testing.assert_close(weights, torch.tensor([0.157894]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        route.attn_residual_weights[0, 1:], torch.tensor([0.842105, 1.0]), atol=1e-6, rtol=0
    )
    raw = find_route(g, [1, 2], threshold=0.1, renormalize=False)
    torch.testing.assert_close(raw.attention_edges()[1], torch.tensor([0.15]))
    torch.testing.assert_close(raw.attn_residual_weights[0, 1:], torch.tensor([0.8, 0.9]))


def slow_route(
    g: FlowGraph, positions: list[int], tau: float
) -> tuple[set[str], set[tuple[str, str]]]:
    """Reference: explicit breadth-first walk over edges, one edge at a time."""
    top = g.n_layers - 1
    frontier = [node_id("I", top, p % g.n_tokens) for p in positions]
    nodes, edges = set(frontier), set()
    incoming: dict[str, list[tuple[str, float]]] = {}
    attention = g.dense_attention()
    for layer in range(g.n_layers):
        for t in range(g.n_tokens):
            a, m, i = node_id("A", layer, t), node_id("M", layer, t), node_id("I", layer, t)
            incoming[i] = [(m, float(g.ffn[layer, t])), (a, float(g.ffn_residual[layer, t]))]
            incoming[m] = [(a, float(g.ffn[layer, t]))]
            incoming[a] = [(source_id(layer, t), float(g.attn_residual[layer, t]))] + [
                (source_id(layer, s), float(attention[layer, t, s])) for s in range(t + 1)
            ]
    while frontier:
        node = frontier.pop()
        for src, weight in incoming.get(node, []):
            if weight >= tau:
                edges.add((src, node))
                if src not in nodes:
                    nodes.add(src)
                    frontier.append(src)
    return nodes, edges


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.0, 0.05, 0.12, 0.3])
def test_vectorized_route_equals_slow_walk(seed: int, tau: float) -> None:
    g = random_graph(seed=seed)
    positions = [-1] if seed % 2 else [2, 5]
    route = find_route(g, positions, threshold=tau, renormalize=False)
    nodes = {n["id"] for n in route_nodes(route)}
    edges = {(e["source"], e["target"]) for e in route_edges(route)}
    slow_nodes, slow_edges = slow_route(g, positions, tau)
    assert nodes == slow_nodes
    assert edges == slow_edges


@pytest.mark.parametrize("seed", range(4))
def test_every_route_node_reaches_the_output_node(seed: int) -> None:
    g = random_graph(n_layers=5, n_tokens=9, seed=seed)
    route = find_route(g, [-1], threshold=0.06, renormalize=True)
    dg = nx.DiGraph((e["source"], e["target"]) for e in route_edges(route))
    output = node_id("I", g.n_layers - 1, g.n_tokens - 1)
    for node in route_nodes(route):
        assert node["id"] == output or nx.has_path(dg, node["id"], output), node


def test_higher_threshold_gives_a_sub_route() -> None:
    g = random_graph(seed=11)
    low = find_route(g, [-1], threshold=0.03)
    high = find_route(g, [-1], threshold=0.1)
    for name in ("attn_residual", "ffn", "ffn_residual", "after_layer"):
        lo, hi = getattr(low, name), getattr(high, name)
        assert not (hi & ~lo).any(), name
    assert low.contains(high.attention_idx).all()
    assert high.n_edges < low.n_edges


def test_several_positions_are_the_union_of_single_routes() -> None:
    g = random_graph(seed=4)
    both = find_route(g, [3, -1], threshold=0.05)
    a, b = find_route(g, [3], threshold=0.05), find_route(g, [-1], threshold=0.05)
    union = torch.cat([a.attention_idx, b.attention_idx]).unique(dim=0)  # sorted row-major
    assert torch.equal(both.attention_idx, union)
    assert torch.equal(both.after_layer, a.after_layer | b.after_layer)


def test_renormalized_survivors_sum_to_one_per_whole() -> None:
    g = random_graph(seed=5)
    route = find_route(g, [-1, 3], threshold=0.08, renormalize=True)
    idx, weights = route.attention_edges()
    attention = torch.zeros(g.n_layers, g.n_tokens, g.n_tokens).index_put_(tuple(idx.T), weights)
    attn_total = attention.sum(-1) + route.attn_residual_weights  # [L, T]
    rows = route.after_attention & (attn_total > 0)
    assert rows.any()
    torch.testing.assert_close(attn_total[rows], torch.ones_like(attn_total[rows]))
    ffn_total = route.ffn_weights + route.ffn_residual_weights
    nodes = route.after_attention & (ffn_total > 0)
    assert nodes.any()
    torch.testing.assert_close(ffn_total[nodes], torch.ones_like(ffn_total[nodes]))


def test_full_graph_has_every_causal_edge() -> None:
    g = random_graph(n_layers=3, n_tokens=6)  # floor 0: every causal edge is stored
    route = full_graph(g)
    assert len(route.attention_idx) == 3 * 6 * 7 // 2
    assert route.after_layer.all() and route.after_attention.all() and route.embeddings.all()
    idx, weights = route.attention_edges()
    torch.testing.assert_close(weights, g.dense_attention()[tuple(idx.T)])
    assert torch.equal(idx, torch.ones(3, 6, 6, dtype=torch.bool).tril().nonzero())


def test_full_graph_has_every_stored_edge() -> None:
    attention, attn_residual, ffn = random_weights(n_layers=3, n_tokens=9, seed=2)
    g = dense_graph(attention, attn_residual, ffn, floor=0.03)
    idx, weights = full_graph(g).attention_edges()
    assert torch.equal(idx, (attention >= 0.03).nonzero())  # the edges below the floor are absent
    torch.testing.assert_close(weights, attention[tuple(idx.T)], rtol=0, atol=0)


def route_weights(route: Route) -> dict[tuple[str, int, int, int], float]:
    """A route's edges → weights, keyed as :func:`tests.graphs.dense_route` keys them."""
    edges = {
        ("attention", layer, t, s): w
        for (layer, t, s), w in zip(*(x.tolist() for x in route.attention_edges()), strict=True)
    }
    masks = (
        ("attn_residual", route.attn_residual, route.attn_residual_weights),
        ("ffn", route.ffn, route.ffn_weights),
        ("ffn_residual", route.ffn_residual, route.ffn_residual_weights),
    )
    for kind, mask, weight in masks:
        for layer, t in mask.nonzero().tolist():
            edges[(kind, layer, t, 0)] = float(weight[layer, t])
    return edges


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("floor", [1e-4, 0.01, 0.03])
@pytest.mark.parametrize("tau_over_floor", [1.0, 1.5, 4.0])
@pytest.mark.parametrize("renormalize", [False, True])
def test_sparse_route_equals_the_dense_walk(
    seed: int, floor: float, tau_over_floor: float, renormalize: bool
) -> None:
    """For τ ≥ ε the route of the sparse graph is the route of the dense weights: the same
    edges with the same weights (the dense walk also sees the edges below ε)."""
    attention, attn_residual, ffn = random_weights(n_layers=5, n_tokens=12, seed=seed, power=6)
    g = dense_graph(attention, attn_residual, ffn, floor=floor)
    assert len(g.attn_weights) < int((attention > 0).sum())  # some edges are not stored
    tau = floor * tau_over_floor
    positions = [-1] if seed % 2 else [4, -1]
    got = route_weights(find_route(g, positions, threshold=tau, renormalize=renormalize))
    want = dense_route(attention, attn_residual, ffn, positions, tau, renormalize)
    assert got.keys() == want.keys()
    # float32 sums of ≤ T + 1 shares ≤ 1 in another order, then one division
    assert got == pytest.approx(want, rel=0, abs=1e-6)


@pytest.mark.parametrize("position", [7, -8, 100])
def test_position_out_of_range_is_an_error(position: int) -> None:
    with pytest.raises(ValueError, match="outside the prompt"):
        find_route(random_graph(), [position])


@pytest.mark.parametrize("tau", [-0.1, 1.5])
def test_threshold_out_of_range_is_an_error(tau: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        find_route(random_graph(), [-1], threshold=tau)
