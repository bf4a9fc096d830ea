"""Dropped attention patterns come back for the rows a view needs (ModelRun.with_attention):
the same pattern as a run that kept it, for plain and intervened runs, in one pass that stops
after the last layer asked for."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_flow.analyses.ablation import ablated_trace
from llm_flow.analyses.interventions import Ablation, HeadRef
from llm_flow.engine.graph import ATTENTION_FLOOR, layer_head_contributions
from llm_flow.engine.routes import find_route, route_head_weights
from llm_flow.engine.trace import PATTERN_BUDGET, attention_floor_for, keeps_patterns, trace
from llm_flow.errors import InputError
from tests.tiny import ARCHS, prompt, tiny_llm


@pytest.fixture(scope="module", params=ARCHS)
def llm(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return tiny_llm(request.param)


def test_recomputed_rows_are_the_kept_pattern(llm) -> None:  # type: ignore[no-untyped-def]
    text = prompt(8, seed=4)
    kept, dropped = llm.run(text), llm.run(text, keep_patterns=False)
    last = kept.n_layers - 1
    rows = {0: [7, 2, 2], last: None}  # unsorted, repeated; every row
    again = dropped.with_attention(rows)
    # The same forward pass computes the same pattern, bit for bit.
    got = again.layers[0].attention_at(torch.tensor([2, 7]))
    assert torch.equal(got, kept.layers[0].pattern[:, [2, 7]])  # type: ignore[index]
    assert again.layers[0].pattern.shape[1] == 2  # type: ignore[union-attr]  # just those rows
    assert torch.equal(again.layers[last].pattern, kept.layers[last].pattern)  # type: ignore[arg-type]
    assert all(layer.pattern is None for layer in again.layers[1:last])
    assert kept.with_attention(rows) is kept  # nothing to recompute


def test_per_head_contributions_of_recomputed_rows(llm) -> None:  # type: ignore[no-untyped-def]
    text = prompt(7, seed=5)
    kept, dropped = llm.run(text), llm.run(text, keep_patterns=False)
    rows = torch.tensor([1, 6])
    for layer in range(kept.n_layers):
        want, _ = layer_head_contributions(kept.layers[layer], rows)
        again = dropped.with_attention({layer: rows}).layers[layer]
        got, _ = layer_head_contributions(again, rows)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_route_head_weights_without_kept_patterns() -> None:
    llm = tiny_llm("llama-gqa")
    kept, dropped = trace(llm, prompt(9)), trace(llm, prompt(9), keep_patterns=False)
    route = find_route(kept.graph, [-1], threshold=0.05)
    idx, want = route_head_weights(kept.run, route)
    idx_again, got = route_head_weights(dropped.run, route)
    assert torch.equal(idx, idx_again)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_intervened_run_recomputes_its_own_patterns() -> None:
    llm = tiny_llm("llama-gqa")
    before = trace(llm, prompt(6))
    ablation = Ablation(heads=(HeadRef(0, 1),), mode="zero")
    kept = ablated_trace(before, ablation, keep_patterns=True).run
    dropped = ablated_trace(before, ablation, keep_patterns=False).run
    last = kept.n_layers - 1
    assert not torch.equal(kept.layers[last].pattern, before.run.layers[last].pattern)  # type: ignore[arg-type]
    again = dropped.with_attention({last: None}).layers[last]
    assert torch.equal(again.pattern, kept.layers[last].pattern)  # type: ignore[arg-type]


def test_the_pass_stops_after_the_last_layer_asked_for() -> None:
    llm = tiny_llm("llama-gqa")
    ids = llm.tokenize(prompt(5))
    fired: list[int] = []

    def seen(layer: int) -> Any:
        return lambda tensor, hook: fired.append(layer)

    hooks = [(llm.hook_name("pattern", layer), seen(layer)) for layer in range(llm.info.n_layers)]
    found = llm.attention_rows(ids, {0: torch.tensor([4])}, fwd_hooks=hooks)
    assert fired == [0] and found[0].shape == (llm.info.n_heads, 1, len(ids))


def test_a_run_that_cannot_recompute_says_so() -> None:
    run = tiny_llm("llama-gqa").run(prompt(4), keep_patterns=False)
    bare = type(run)(**{**run.__dict__, "patterns": None})
    with pytest.raises(InputError, match="keep_patterns=True"):
        bare.with_attention({0: [1]})
    with pytest.raises(InputError, match="no attention pattern for these rows"):
        run.layers[0].attention_at(torch.tensor([1]))


def test_traces_keep_patterns_while_they_fit_the_budget() -> None:
    llm = tiny_llm("llama-gqa")
    info = llm.info
    per_token2 = info.n_layers * info.n_heads * 4  # float32 bytes per (query, source) pair
    assert keeps_patterns(llm, 10, budget=100 * per_token2)
    assert not keeps_patterns(llm, 11, budget=100 * per_token2)
    assert keeps_patterns(llm, 1024)  # a tiny model: far below PATTERN_BUDGET
    assert PATTERN_BUDGET >= 2**30
    assert trace(llm, prompt(5)).run.layers[0].pattern is not None


def test_traces_store_every_edge_while_the_full_graph_is_small() -> None:
    llm = tiny_llm("llama-gqa")
    n_layers = llm.info.n_layers
    edges_10 = n_layers * 10 * 11 // 2  # causal edges of a 10-token prompt
    assert attention_floor_for(llm, 10, budget=8 * edges_10) == 0.0
    assert attention_floor_for(llm, 11, budget=8 * edges_10) == ATTENTION_FLOOR
    assert trace(llm, prompt(5)).graph.attention_floor == 0.0  # a route at τ = 0 is everything
    assert trace(llm, prompt(5), attention_floor=0.01).graph.attention_floor == 0.01
