"""Tests for the ablated trace (``ablation.ablated_trace``), ``llm_flow/analyses/route_diff.py`` and
``llm-flow ablate --graph-diff``.

The ablated trace is checked against independent computations: the logits of the plain ablated
pass, the bias an ablated head must leave behind (its mean ``z`` through ``W_O``), and the
per-head contributions of an ablated head (exactly zero)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_flow.analyses.ablation import ablated_logits, ablated_trace
from llm_flow.analyses.interventions import (
    Ablation,
    EdgeRef,
    ExpertRef,
    HeadRef,
    MeanActivations,
    NeuronRef,
    mean_activations,
)
from llm_flow.analyses.route_diff import STATUSES, RouteDiff, RouteDiffError
from llm_flow.engine.graph import layer_head_contributions
from llm_flow.engine.routes import find_route
from llm_flow.engine.trace import trace
from llm_flow.models.bridge import BridgeLlm
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import ARCHS, prompt, tiny_llm

N_TOKENS = 9


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> tuple[BridgeLlm, MeanActivations]:
    llm = tiny_llm(request.param)
    return llm, mean_activations(llm, [prompt(7, seed) for seed in (1, 2, 3)])


def everything(mode: str, llm: BridgeLlm) -> Ablation:
    """Heads, an edge and a neuron (for a mixture of experts: an expert) of layer 0."""
    moe = bool(llm.info.moe_layers)
    return Ablation(
        heads=(HeadRef(1, 2), HeadRef(2, 0, position=5)),
        neurons=() if moe else (NeuronRef(0, 3),),
        edges=(EdgeRef(1, 2, 7),),
        mode="mean" if mode == "mean" else "zero",
        experts=(ExpertRef(0, 1),) if moe else (),
    )


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablated_trace_is_the_ablated_pass(
    model: tuple[BridgeLlm, MeanActivations], mode: str
) -> None:
    llm, means = model
    text = prompt(N_TOKENS)
    ablation = everything(mode, llm)
    # Self-checks run on every layer of the traced run: passing them is part of this test.
    after = ablated_trace(trace(llm, text), ablation, means)
    run, graph = after.run, after.graph
    want = ablated_logits(llm, llm.tokenize(text), ablation, means)
    torch.testing.assert_close(run.logits, want, rtol=0, atol=1e-5)
    assert float(graph.attention_at(1, 7, 2)) == 0.0  # the ablated edge carries nothing
    plain = trace(llm, text).graph
    assert not torch.allclose(plain.dense_attention(), graph.dense_attention())


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_an_ablated_head_reads_from_no_token(
    model: tuple[BridgeLlm, MeanActivations], mode: str
) -> None:
    llm, means = model
    plain = trace(llm, prompt(N_TOKENS)).run
    run = ablated_trace(trace(llm, prompt(N_TOKENS)), everything(mode, llm), means).run
    rows = torch.arange(run.n_tokens)
    heads, _ = layer_head_contributions(run.layers[1], rows)  # [R, S, H], head 2 ablated
    assert float(heads[:, :, 2].abs().max()) == 0.0
    plain_heads, _ = layer_head_contributions(plain.layers[1], rows)
    assert float(plain_heads[:, :, 2].sum()) > 0  # it did read before
    # Ablated at position 5 only, a head still reads at the layer's other rows, exactly as in
    # the plain run (nothing upstream changed).
    only = Ablation(heads=(HeadRef(2, 0, position=5),), mode=everything(mode, llm).mode)
    at_five, _ = layer_head_contributions(
        ablated_trace(trace(llm, prompt(N_TOKENS)), only, means).run.layers[2], rows
    )
    assert float(at_five[5, :, 0].abs().max()) == 0.0
    plain_two, _ = layer_head_contributions(plain.layers[2], rows)
    others = rows != 5
    torch.testing.assert_close(at_five[others], plain_two[others], rtol=1e-5, atol=1e-6)


def test_mean_ablation_books_the_mean_output_as_bias(
    model: tuple[BridgeLlm, MeanActivations],
) -> None:
    llm, means = model
    plain = trace(llm, prompt(N_TOKENS)).run
    run = ablated_trace(trace(llm, prompt(N_TOKENS)), everything("mean", llm), means).run
    layer = run.layers[1]
    mean_output = means.z[1, 2].to(layer.W_O) @ layer.W_O[2]  # [D]
    extra = layer.token_b_O - plain.layers[1].token_b_O  # [T, D]
    torch.testing.assert_close(extra, mean_output.expand_as(extra), rtol=1e-4, atol=1e-5)


def test_an_empty_ablation_traces_the_plain_graph(
    model: tuple[BridgeLlm, MeanActivations],
) -> None:
    llm, _ = model
    plain = trace(llm, prompt(N_TOKENS)).graph
    same = ablated_trace(trace(llm, prompt(N_TOKENS)), Ablation()).graph
    torch.testing.assert_close(same.dense_attention(), plain.dense_attention(), rtol=0, atol=1e-6)
    torch.testing.assert_close(same.ffn, plain.ffn, rtol=0, atol=1e-6)
    coarse = trace(llm, prompt(N_TOKENS), attention_floor=0.01)
    assert ablated_trace(coarse, Ablation()).graph.attention_floor == 0.01  # stored alike


# -- RouteDiff --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma() -> BridgeLlm:
    return tiny_llm("gemma3-postnorm")  # the tiny model whose routes hold attention edges at τ


def test_a_route_against_itself_keeps_every_edge(gemma: BridgeLlm) -> None:
    graph = trace(gemma, prompt(N_TOKENS)).graph
    route = find_route(graph, [-1], 0.05)
    diff = RouteDiff(route, route)
    edges = diff.edges()
    assert len(edges) == route.n_edges > 0
    assert {e.status for e in edges} == {"kept"} and all(e.change == 0 for e in edges)
    assert diff.part("lost").n_edges == diff.part("gained").n_edges == 0


def test_cutting_a_route_edge_loses_it(gemma: BridgeLlm) -> None:
    text = prompt(N_TOKENS)
    graph = trace(gemma, text).graph
    before = find_route(graph, [-1], 0.05)
    idx, weights = before.attention_edges()
    between = idx[:, 1] != idx[:, 2]  # edges that move information between tokens
    strongest = int(torch.where(between, weights, -1.0).argmax())
    layer, t, s = idx[strongest].tolist()
    cut = ablated_trace(trace(gemma, text), Ablation(edges=(EdgeRef(layer, s, t),))).graph
    diff = RouteDiff(before, find_route(cut, [-1], 0.05))
    edges = {(e.source, e.target, e.kind): e for e in diff.edges()}
    source = "X0_" + str(s) if layer == 0 else f"I{layer - 1}_{s}"
    lost = edges[(source, f"A{layer}_{t}", "attention")]
    assert lost.status == "lost" and lost.after == 0.0
    assert lost.before == pytest.approx(float(weights[strongest]))
    # The parts partition both routes.
    counts = {status: sum(e.status == status for e in diff.edges()) for status in STATUSES}
    assert counts["kept"] + counts["lost"] == diff.before.n_edges
    assert counts["kept"] + counts["gained"] == diff.after.n_edges
    for status in STATUSES:
        assert diff.part(status).n_edges == counts[status]
    data = diff.to_dict()
    assert data["n_edges"] == counts and len(data["edges"]) == sum(counts.values())
    changes = [abs(e["change"]) for e in data["edges"]]
    assert changes == sorted(changes, reverse=True)


def test_routes_of_different_settings_do_not_compare(gemma: BridgeLlm) -> None:
    graph = trace(gemma, prompt(N_TOKENS)).graph
    with pytest.raises(RouteDiffError, match="threshold"):
        RouteDiff(find_route(graph, [-1], 0.05), find_route(graph, [-1], 0.1))
    other = trace(gemma, prompt(N_TOKENS, seed=3)).graph
    with pytest.raises(RouteDiffError, match="different prompts"):
        RouteDiff(find_route(graph, [-1], 0.05), find_route(other, [-1], 0.05))


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_file(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("graph-diff") / "config.json"
    config = {"models": {"tiny": {"source": "local", "path": str(saved_tiny("gemma3-postnorm"))}}}
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_ablate_graph_diff_json(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    argv = ("ablate", "--config", str(config_file), "--prompt", prompt(N_TOKENS))
    code, out, err = run_cli(capsys, *argv, "--heads", "2.0,2.1", "--graph-diff")
    assert (code, err) == (0, "")
    data = json.loads(out)["graph_diff"]
    assert data["threshold"] == 0.04 and data["renormalize"] is True
    assert data["positions"] == [len(json.loads(out)["tokens"]) - 1]
    assert sum(data["n_edges"].values()) == len(data["edges"]) > 0
    assert data["n_edges"]["lost"] + data["n_edges"]["gained"] > 0
    for edge in data["edges"]:
        assert edge["change"] == pytest.approx(edge["after"] - edge["before"])
    code, out, _ = run_cli(capsys, *argv, "--heads", "2.1", "--graph-diff", "--threshold", "0.2")
    assert code == 0 and json.loads(out)["graph_diff"]["threshold"] == 0.2
    code, out, _ = run_cli(capsys, *argv, "--heads", "2.1")
    assert code == 0 and "graph_diff" not in json.loads(out)


def test_ablate_graph_diff_rejects_a_bad_threshold(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    argv = ("ablate", "--config", str(config_file), "--prompt", prompt(N_TOKENS))
    code, out, err = run_cli(capsys, *argv, "--heads", "2.1", "--graph-diff", "--threshold", "2")
    assert code == 2 and out == "" and "threshold must be between 0 and 1" in err


def test_graph_diff_reports_the_same_before_and_after(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    argv = ("ablate", "--config", str(config_file), "--prompt", prompt(N_TOKENS), "--heads", "2.0")
    _, plain, _ = run_cli(capsys, *argv)
    _, traced, _ = run_cli(capsys, *argv, "--graph-diff")
    want, got = json.loads(plain), json.loads(traced)
    for side in ("before", "after"):
        assert [t["id"] for t in got[side]["top"]] == [t["id"] for t in want[side]["top"]]
        for mine, theirs in zip(got[side]["top"], want[side]["top"], strict=True):
            assert mine["prob"] == pytest.approx(theirs["prob"], abs=1e-6)


def test_kept_edges_are_split_by_how_much_they_changed() -> None:
    """Issue 12: ablating a head halved the logit difference yet the diff said "0 lost,
    0 gained"; kept edges that fell from 0.306 to 0.056 must be counted as weakened."""
    from llm_flow.analyses.route_diff import SHIFTS, shift_of
    from tests.graphs import random_graph

    assert shift_of(0.306, 0.056) == "weakened"
    assert shift_of(0.1, 0.2) == "strengthened" and shift_of(0.1, 0.15) == "similar"
    graph = random_graph()
    before = find_route(graph, [graph.n_tokens - 1], 0.02, renormalize=False)
    after_graph = random_graph(seed=1)
    # same tokens: a diff of two routes over graphs with the same token ids
    after = find_route(after_graph, [graph.n_tokens - 1], 0.02, renormalize=False)
    diff = RouteDiff(before, after)
    counts = diff.counts()
    kept = diff.kept_by_shift()
    assert sum(counts[s] for s in SHIFTS) == counts["kept"] == diff.part("kept").n_edges
    assert [kept[s].n_edges for s in SHIFTS] == [counts[s] for s in SHIFTS]
    assert counts["weakened"] + counts["strengthened"] > 0  # random weights move a lot
    by_edge = {(e.source, e.target, e.kind): e for e in diff.edges()}
    assert all(
        shift_of(by_edge[k].before, by_edge[k].after) == "weakened"
        for k in by_edge
        if by_edge[k].status == "kept" and by_edge[k].after * 2 <= by_edge[k].before
    )
    data = diff.to_dict()
    assert data["n_kept_by_change"] == {s: counts[s] for s in SHIFTS}
    # Each edge of the JSON says how it moved; only kept edges have a shift.
    for e in data["edges"]:
        expected = shift_of(e["before"], e["after"]) if e["status"] == "kept" else None
        assert e["shift"] == expected
    with pytest.raises(RouteDiffError, match="above 1"):
        diff.kept_by_shift(1.0)
