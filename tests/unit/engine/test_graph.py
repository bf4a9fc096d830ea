"""Building the graph from a run, streaming per layer, and exporting it."""

from __future__ import annotations

import io
import json

import networkx as nx
import pytest
import torch

from llm_flow.engine.graph import contributions_of
from llm_flow.engine.routes import find_route, full_graph
from llm_flow.engine.trace import trace
from llm_flow.io.export import graph_json, to_graphml, to_networkx
from tests.conftest import f32_tol
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
    for layer, streamed in zip(full_run.layers, graph.attention, strict=True):
        torch.testing.assert_close(contributions_of(layer).attention, streamed, rtol=0, atol=tol)
    assert graph.attention.shape == (n_layers, run.n_tokens, run.n_tokens)
    assert graph.tokens == run.tokens and graph.token_ids == run.token_ids


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
