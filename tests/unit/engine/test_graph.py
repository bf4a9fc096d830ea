"""Building the graph from a run, streaming per layer, and exporting it."""

from __future__ import annotations

import dataclasses
import io
import json

import networkx as nx
import pytest
import torch

from llm_flow.engine import graph as graph_module
from llm_flow.engine.graph import ATTENTION_FLOOR, FlowGraph, contributions_of, sparse_layer
from llm_flow.engine.kernels import edge_rows_cpu
from llm_flow.engine.routes import find_route, full_graph
from llm_flow.engine.trace import trace
from llm_flow.errors import InputError
from llm_flow.io.export import graph_json, to_graphml, to_networkx
from tests.conftest import f32_tol
from tests.graphs import dense_graph, random_weights
from tests.tiny import ARCHS, prompt, tiny_llm


@pytest.fixture(scope="module", params=ARCHS)
def llm(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return tiny_llm(request.param)


def test_trace_streams_layers_and_matches_a_run_with_patterns(llm) -> None:  # type: ignore[no-untyped-def]
    text = prompt(9, seed=1)
    seen: list[tuple[int, int]] = []
    tr = trace(llm, text, keep_patterns=False, on_layer=lambda d, n: seen.append((d, n)))
    run, graph = tr.run, tr.graph
    n_layers = llm.info.n_layers
    assert seen == [(i + 1, n_layers) for i in range(n_layers)]
    assert all(layer.pattern is None for layer in run.layers)
    full_run = llm.run(text)
    # The same float32 math on the same pass, maybe reduced in another order: shares ≤ 1 from
    # proximities summed over D terms, D eps.
    tol = f32_tol(terms=llm.info.d_model)
    for i, layer in enumerate(full_run.layers):
        dense = contributions_of(layer).attention
        stored = graph.attention_rows(i)
        # an edge within tol of the floor may be stored on one pass only
        kept = (dense >= graph.attention_floor + tol) | (stored > 0)
        torch.testing.assert_close(torch.where(kept, dense, 0.0), stored, rtol=0, atol=tol)
    assert graph.attn_dropped.shape == (n_layers, run.n_tokens)
    assert graph.tokens == run.tokens and graph.token_ids == run.token_ids


@pytest.mark.parametrize("floor", [0.0, ATTENTION_FLOOR, 0.01])
def test_sparse_graph_is_the_dense_graph_above_the_floor(llm, floor: float) -> None:  # type: ignore[no-untyped-def]
    """Every edge ≥ ε is stored with its exact weight, the rest is the row's dropped share, and
    every attention whole still sums to 1."""
    run = llm.run(prompt(12, seed=3))
    layers = [contributions_of(layer) for layer in run.layers]
    graph = FlowGraph.from_layers(run, [sparse_layer(c, floor) for c in layers])
    assert graph.attention_floor == floor
    dense = torch.stack([c.attention for c in layers])  # [L, T, T]
    kept = (dense >= floor) & torch.ones_like(dense, dtype=torch.bool).tril()
    assert len(graph.attn_weights) == int(kept.sum())
    torch.testing.assert_close(
        graph.dense_attention(), torch.where(kept, dense, 0.0), rtol=0, atol=0
    )
    dropped = torch.where(kept, 0.0, dense).sum(-1)
    # shares ≤ 1 summed in another order: at most T terms' rounding apart
    torch.testing.assert_close(
        graph.attn_dropped, dropped, rtol=0, atol=f32_tol(terms=run.n_tokens)
    )
    ffn = graph.ffn if run.parallel_blocks else torch.zeros_like(graph.ffn)  # parallel: one sum
    total = graph.dense_attention().sum(-1) + graph.attn_dropped + graph.attn_residual
    total = total + graph.attn_bias + ffn
    # shares ≤ 1 of one normalization, re-summed in float32 over ≤ T + 3 terms
    torch.testing.assert_close(
        total, torch.ones_like(total), rtol=0, atol=f32_tol(terms=run.n_tokens + 3)
    )


@pytest.mark.parametrize("floor", [0.0, 1e-3, 0.01, 2.0])
def test_cpu_edge_rows_are_the_torch_ones(floor: float) -> None:
    """The numba CSR rows (CPU) and the torch ones (GPUs) keep the same causal edges, in the
    same order, with the same dropped sums; weights equal to the floor are kept, and entries
    past the diagonal are never edges (nor dropped)."""
    gen = torch.Generator().manual_seed(7)
    attention = torch.rand(37, 37, generator=gen) / 20
    attention[5, :3] = 1e-3  # exactly at a floor
    attention[3, 10] = 0.5  # past the diagonal: no edge
    fast = edge_rows_cpu(attention, floor)
    reference = graph_module._edge_rows(attention, floor)
    for got, expected in zip(fast[:3], reference[:3], strict=True):
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)
    dropped_ref = torch.where(torch.ones(37, 37, dtype=torch.bool).tril(), attention, 0.0)
    dropped_ref = torch.where(dropped_ref >= floor, 0.0, dropped_ref).sum(1)
    torch.testing.assert_close(fast[3], dropped_ref, rtol=0, atol=f32_tol(terms=37))
    assert int(fast[0].sum()) == len(fast[1]) == len(fast[2])


def test_accessors_read_the_stored_edges() -> None:
    attention, attn_residual, ffn = random_weights(n_layers=3, n_tokens=10, seed=4, power=5)
    g = dense_graph(attention, attn_residual, ffn, floor=0.02)
    stored = torch.where(attention >= 0.02, attention, 0.0)
    assert torch.equal(g.dense_attention(), stored)
    rows = torch.tensor([9, 0, 4, 4])
    assert torch.equal(g.attention_rows(1, rows), stored[1, rows])
    layer, t, s = torch.meshgrid(torch.arange(3), torch.arange(10), torch.arange(10), indexing="ij")
    assert torch.equal(g.attention_at(layer, t, s), stored)  # 0 above the diagonal, below ε
    assert float(g.attention_at(2, 9, 3)) == float(stored[2, 9, 3])
    row, edge = g.row_edges(1, rows)
    assert torch.equal(g.attn_weights[edge], stored[1, rows[row], g.attn_sources[edge].long()])


def test_stored_edges_grow_linearly_with_the_prompt() -> None:
    """With a bounded number of edges ≥ ε per row (as real contributions have: Σ c ≤ 1, so at
    most 1/ε of them), the graph's elements grow linearly in T, not as T²."""

    def n_elements(n_tokens: int) -> int:
        gen = torch.Generator().manual_seed(n_tokens)
        attention = torch.full((2, n_tokens, n_tokens), 1e-6).tril()  # every causal edge tiny
        reach = torch.arange(1, n_tokens + 1)[:, None]  # row t has sources 0..t
        sources = (torch.rand(2, n_tokens, 8, generator=gen) * reach).long()
        attention.scatter_(2, sources, 0.05)  # ≤ 8 edges above ε per row
        half = torch.full((2, n_tokens), 0.5)
        g = dense_graph(attention, half, half, floor=ATTENTION_FLOOR)
        tensors = [getattr(g, f.name) for f in dataclasses.fields(g)]
        return sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))

    small, large = n_elements(256), n_elements(1024)
    assert large / small < 4 * 1.3  # 4× the tokens: ~4× the elements (dense would be 16×)


def test_attention_floor_is_checked() -> None:
    attention, attn_residual, ffn = random_weights(n_layers=1, n_tokens=3)
    with pytest.raises(InputError, match="attention floor"):
        dense_graph(attention, attn_residual, ffn, floor=1.0)


def test_contributions_need_a_pattern(llm) -> None:  # type: ignore[no-untyped-def]
    run = llm.run(prompt(4), keep_patterns=False)
    with pytest.raises(ValueError, match="no attention pattern"):
        contributions_of(run.layers[0])


def test_json_and_graphml_round_trip(llm) -> None:  # type: ignore[no-untyped-def]
    tr = trace(llm, prompt(8, seed=2))
    route = find_route(tr.graph, [-1], threshold=0.05)
    data = graph_json(tr, route, position=tr.n_tokens - 1, heads=True)
    assert json.loads(json.dumps(data)) == data
    g = to_networkx(data)
    assert g.number_of_nodes() == len(data["nodes"])
    assert g.number_of_edges() == len(data["edges"])
    back = nx.read_graphml(io.StringIO(to_graphml(data)), force_multigraph=True)
    assert set(back.nodes) == {n["id"] for n in data["nodes"]}
    assert back.number_of_edges() == len(data["edges"])
    for edge in data["edges"]:
        attrs = back.edges[edge["source"], edge["target"], edge["kind"]]
        assert attrs["weight"] == edge["weight"]  # GraphML holds repr(float): it round-trips
        assert attrs["kind"] == edge["kind"]
    assert back.graph["model"] == data["model"]


def test_edge_heads_are_the_layer_head_contributions(llm) -> None:  # type: ignore[no-untyped-def]
    from llm_flow.engine.graph import layer_head_contributions

    tr = trace(llm, prompt(7, seed=5))
    run = tr.run
    data = graph_json(tr, full_graph(tr.graph), position=-1, heads=True)
    attention = [e for e in data["edges"] if e["kind"] == "attention"]
    assert all("heads" not in e for e in data["edges"] if e["kind"] != "attention")
    edge = attention[len(attention) // 2]
    layer, t = (int(x) for x in edge["target"][1:].split("_"))
    s = int(edge["source"].split("_")[1])
    heads, _ = layer_head_contributions(run.layers[layer], torch.tensor([t]))
    assert len(edge["heads"]) == llm.info.n_heads
    # Both float32, computed for other sets of rows: shares ≤ 1 from D-term sums, D eps.
    tol = f32_tol(terms=llm.info.d_model)
    assert [edge["heads"][str(h)] for h in range(llm.info.n_heads)] == pytest.approx(
        heads[0, s].tolist(), rel=0, abs=tol
    )


def test_predictions_are_the_greedy_tokens_of_every_position(llm) -> None:  # type: ignore[no-untyped-def]
    tr = trace(llm, prompt(5))
    assert len(tr.predictions) == tr.n_tokens
    for t in range(tr.n_tokens):
        token, token_id, prob = tr.prediction(t)
        assert token_id == int(tr.run.logits[t].argmax())
        # Two float32 softmaxes of the same row, probabilities ≤ 1: each rounds its V exps, their
        # sum and a division, ≤ (V + 1) eps apart in all.
        tol = f32_tol(terms=llm.info.d_vocab + 1)
        assert prob == pytest.approx(float(tr.run.logits[t].softmax(-1).max()), rel=0, abs=tol)
        assert token == llm.token_strings([token_id])[0]
    assert tr.prediction(-1) == tr.prediction(tr.n_tokens - 1)
