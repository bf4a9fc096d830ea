"""Thresholding, renormalization and top-down route extraction."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from llm_flow.engine.edges import route_edges, route_nodes
from llm_flow.engine.graph import FlowGraph
from llm_flow.engine.nodes import node_id, source_id
from llm_flow.engine.routes import find_route, full_graph


def make_graph(
    attention: torch.Tensor, attn_residual: torch.Tensor, ffn: torch.Tensor
) -> FlowGraph:
    n_layers, n_tokens = attn_residual.shape
    return FlowGraph(
        model_name="hand",
        tokens=tuple(f"t{i}" for i in range(n_tokens)),
        token_ids=tuple(range(n_tokens)),
        attention=attention,
        attn_residual=attn_residual,
        attn_bias=1 - attention.sum(-1) - attn_residual,
        ffn=ffn,
        ffn_residual=1 - ffn,
    )


def random_graph(n_layers: int = 4, n_tokens: int = 7, seed: int = 0) -> FlowGraph:
    """Random normalized contributions with the engine's structure (causal, rows sum to 1)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(n_layers, n_tokens, n_tokens + 1, generator=gen) ** 3
    raw[:, :, :n_tokens] *= torch.ones(n_tokens, n_tokens).tril()
    c = raw / raw.sum(-1, keepdim=True)
    ffn = torch.rand(n_layers, n_tokens, generator=gen)
    return FlowGraph(
        model_name="random",
        tokens=tuple(f"t{i}" for i in range(n_tokens)),
        token_ids=tuple(range(n_tokens)),
        attention=c[:, :, :n_tokens].contiguous(),
        attn_residual=c[:, :, n_tokens].contiguous(),
        attn_bias=torch.zeros(n_layers, n_tokens),
        ffn=ffn,
        ffn_residual=1 - ffn,
    )


def test_llm_tt_threshold_case() -> None:
    """Blocks [.05, .15] + residual .8 and [.05, .05] + residual .9 at τ = 0.1, renormalized:
    [0, .157894] + .842105 and [0, 0] + 1.0 (the published LLM-TT unit case)."""
    attention = torch.zeros(1, 3, 3)
    attention[0, 1, :2] = torch.tensor([0.05, 0.15])
    attention[0, 2, :2] = torch.tensor([0.05, 0.05])
    attn_residual = torch.tensor([[1.0, 0.8, 0.9]])
    g = make_graph(attention, attn_residual, ffn=torch.full((1, 3), 0.5))
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
    for layer in range(g.n_layers):
        for t in range(g.n_tokens):
            a, m, i = node_id("A", layer, t), node_id("M", layer, t), node_id("I", layer, t)
            incoming[i] = [(m, float(g.ffn[layer, t])), (a, float(g.ffn_residual[layer, t]))]
            incoming[m] = [(a, float(g.ffn[layer, t]))]
            incoming[a] = [(source_id(layer, t), float(g.attn_residual[layer, t]))] + [
                (source_id(layer, s), float(g.attention[layer, t, s])) for s in range(t + 1)
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
    for name in ("attention", "attn_residual", "ffn", "ffn_residual", "after_layer"):
        lo, hi = getattr(low, name), getattr(high, name)
        assert not (hi & ~lo).any(), name
    assert high.n_edges < low.n_edges


def test_several_positions_are_the_union_of_single_routes() -> None:
    g = random_graph(seed=4)
    both = find_route(g, [3, -1], threshold=0.05)
    a, b = find_route(g, [3], threshold=0.05), find_route(g, [-1], threshold=0.05)
    assert torch.equal(both.attention, a.attention | b.attention)
    assert torch.equal(both.after_layer, a.after_layer | b.after_layer)


def test_renormalized_survivors_sum_to_one_per_whole() -> None:
    g = random_graph(seed=5)
    route = find_route(g, [-1, 3], threshold=0.08, renormalize=True)
    idx, weights = route.attention_edges()
    attention = torch.zeros_like(g.attention).index_put_(tuple(idx.T), weights)
    attn_total = attention.sum(-1) + route.attn_residual_weights  # [L, T]
    rows = route.after_attention & (attn_total > 0)
    assert rows.any()
    torch.testing.assert_close(attn_total[rows], torch.ones_like(attn_total[rows]))
    ffn_total = route.ffn_weights + route.ffn_residual_weights
    nodes = route.after_attention & (ffn_total > 0)
    assert nodes.any()
    torch.testing.assert_close(ffn_total[nodes], torch.ones_like(ffn_total[nodes]))


def test_full_graph_has_every_causal_edge() -> None:
    g = random_graph(n_layers=3, n_tokens=6)
    route = full_graph(g)
    assert int(route.attention.sum()) == 3 * 6 * 7 // 2
    assert route.after_layer.all() and route.after_attention.all() and route.embeddings.all()
    idx, weights = route.attention_edges()
    torch.testing.assert_close(weights, g.attention[tuple(idx.T)])
    assert torch.equal(route.attention, g.attention.new_ones(g.attention.shape).tril().bool())


@pytest.mark.parametrize("position", [7, -8, 100])
def test_position_out_of_range_is_an_error(position: int) -> None:
    with pytest.raises(ValueError, match="outside the prompt"):
        find_route(random_graph(), [position])


@pytest.mark.parametrize("tau", [-0.1, 1.5])
def test_threshold_out_of_range_is_an_error(tau: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        find_route(random_graph(), [-1], threshold=tau)
