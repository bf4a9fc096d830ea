"""Tests for llm_flow/analyses/faithfulness.py and ``llm-flow faithfulness``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_flow.analyses.faithfulness import (
    Components,
    FaithfulnessError,
    faithfulness,
    head_mask,
    heads_only,
    random_heads,
    route_components,
)
from llm_flow.analyses.interventions import MeanActivations, mean_activations
from llm_flow.engine.graph import layer_head_contributions
from llm_flow.engine.routes import Route, find_route
from llm_flow.engine.trace import trace
from llm_flow.models.bridge import BridgeLlm
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import prompt, tiny_llm

TEXT = prompt(6)


@pytest.fixture(scope="module")
def llm() -> BridgeLlm:
    return tiny_llm("llama-gqa")


@pytest.fixture(scope="module")
def means(llm: BridgeLlm) -> MeanActivations:
    return mean_activations(llm, [prompt(5, seed=s) for s in range(1, 4)])


def test_full_graph_keeps_everything_that_reaches_the_output(
    llm: BridgeLlm, means: MeanActivations
) -> None:
    """τ = 0: every component that can reach the output position is on the route, so keeping
    the route alone leaves the metric exactly as it was (with every edge stored: a floor of 0)."""
    every = trace(llm, TEXT, attention_floor=0.0)
    report = faithfulness(
        every, threshold=0.0, target="w3", distractor="w7", means=means, seeds=[0]
    )
    assert report.metric == "logit_diff"
    assert report.route.value == pytest.approx(report.full, abs=1e-6)
    assert report.route.share == pytest.approx(1.0, abs=1e-5)
    # What it ablates is only what cannot reach the output: the last layer at other positions.
    assert report.route.ablated_heads == 4 * (7 - 1)
    assert report.route.ablated_ffn == 7 - 1


def test_empty_route_ablates_nothing_in_the_complement(
    llm: BridgeLlm, means: MeanActivations
) -> None:
    report = faithfulness(
        trace(llm, TEXT), threshold=1.0, target="w3", distractor="w7", means=means, seeds=[0, 1]
    )
    assert report.n_route_heads == 0 and report.n_route_ffn == 0
    assert report.complement.value == report.full and report.complement.share == 1.0
    assert report.route.value == pytest.approx(report.all_ablated, abs=1e-6)
    assert all(s.value == report.full for s in report.random)  # zero random components


def test_scores_are_consistent(llm: BridgeLlm, means: MeanActivations) -> None:
    report = faithfulness(
        trace(llm, TEXT), threshold=0.02, target="w3", distractor="w7", means=means, seeds=[0, 1, 2]
    )
    assert report.n_route_heads > 0 and report.n_route_ffn > 0
    for score in (report.route, report.complement, report.route_heads, *report.random):
        assert score.share == pytest.approx(score.value / report.full)
    assert report.complement.ablated_heads == report.n_route_heads
    assert report.complement.ablated_ffn == report.n_route_ffn
    assert report.route.ablated_heads == report.total_heads - report.n_route_heads
    assert report.route_heads.ablated_heads == report.n_route_heads
    assert report.route_heads.ablated_ffn == 0
    assert report.total_heads == 3 * 7 * 4 and report.total_ffn == 3 * 7
    assert all(
        s.ablated_heads == report.n_route_heads and s.ablated_ffn == 0 for s in report.random
    )
    shares = torch.tensor([s.share for s in report.random], dtype=torch.float64)
    assert report.random_share_mean == pytest.approx(float(shares.mean()))
    assert report.random_share_sd == pytest.approx(float(shares.std()))
    data = report.to_dict()
    assert set(data["random_heads"]) >= {"seeds", "values", "share_mean", "share_sd"}
    json.dumps(data)


def test_log_prob_metric_and_default_target(llm: BridgeLlm) -> None:
    report = faithfulness(trace(llm, TEXT), threshold=0.02, mode="zero", seeds=[0])
    run = llm.run(TEXT)
    top = int(run.logits[-1].argmax())
    assert report.metric == "target_logprob" and report.distractor is None
    assert report.target == llm.token_strings([top])[0]
    assert report.full == pytest.approx(float(run.logits[-1].log_softmax(-1)[top]), abs=1e-5)
    span = report.full - report.all_ablated
    assert report.route.share == pytest.approx((report.route.value - report.all_ablated) / span)


def test_renormalize_is_passed_to_the_route_and_leaves_the_components(
    llm: BridgeLlm, means: MeanActivations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check tests the route as asked (with or without renormalized weights); τ prunes on
    the original scale, so both routes have the same components and hence the same scores."""
    import llm_flow.analyses.faithfulness as module

    asked: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> Route:
        route = find_route(*args, **kwargs)
        asked.append(route.renormalize)
        return route

    monkeypatch.setattr(module, "find_route", spy)
    kwargs: dict[str, Any] = {"target": "w3", "distractor": "w7", "means": means, "seeds": [0]}
    raw = faithfulness(trace(llm, TEXT), threshold=0.02, renormalize=False, **kwargs)
    scaled = faithfulness(trace(llm, TEXT), threshold=0.02, **kwargs)
    assert asked == [False, True]
    assert (raw.renormalize, scaled.renormalize) == (False, True)
    assert raw.to_dict()["renormalize"] is False and scaled.to_dict()["renormalize"] is True

    tr = trace(llm, TEXT)
    want = route_components(tr.run, find_route(tr.graph, [-1], 0.02, renormalize=False))
    assert 0 < want.n_heads < want.heads.numel()
    assert (raw.n_route_heads, raw.n_route_ffn) == (want.n_heads, want.n_ffn)
    assert (scaled.n_route_heads, scaled.n_route_ffn) == (want.n_heads, want.n_ffn)
    for a, b in zip(
        (raw.route, raw.complement, raw.route_heads, *raw.random),
        (scaled.route, scaled.complement, scaled.route_heads, *scaled.random),
        strict=True,
    ):
        assert a.value == pytest.approx(b.value, abs=1e-6)


def test_head_mask_follows_the_per_head_threshold(llm: BridgeLlm) -> None:
    tr = trace(llm, TEXT)
    run, route = tr.run, find_route(tr.graph, [-1], 0.01)
    mask = head_mask(run, route, 0.01)
    assert 0 < int(mask.sum()) < mask.numel()
    want = torch.zeros_like(mask)
    for layer, t, s in route.attention_idx.tolist():  # the naive loop, edge by edge
        heads, _ = layer_head_contributions(run.layers[layer], torch.tensor([t]))
        want[layer, t] |= heads[0, s] >= 0.01
    assert torch.equal(mask, want)
    components = route_components(run, route)
    assert torch.equal(components.ffn, route.ffn)


def test_random_heads_match_the_count_and_are_seeded() -> None:
    like = Components(
        heads=torch.rand(3, 7, 4, generator=torch.Generator().manual_seed(0)) > 0.8,
        ffn=torch.tensor([[True] * 3 + [False] * 4] * 3),
    )
    a, b, c = random_heads(like, 1), random_heads(like, 1), random_heads(like, 2)
    assert a.n_heads == like.n_heads > 0 and a.n_ffn == 0
    assert torch.equal(a.heads, b.heads) and not torch.equal(a.heads, c.heads)
    only = heads_only(like)
    assert torch.equal(only.heads, like.heads) and only.n_ffn == 0


def test_argument_errors(llm: BridgeLlm, means: MeanActivations) -> None:
    with pytest.raises(FaithfulnessError, match="needs a target"):
        faithfulness(trace(llm, TEXT), distractor="w7", means=means)
    with pytest.raises(FaithfulnessError, match="mean activations"):
        faithfulness(trace(llm, TEXT))


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_file(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faith-cli")
    (folder / "prompts").mkdir()
    (folder / "prompts" / "factual.txt").write_text(f"{prompt(4, 1)}\n{prompt(5, 2)}\n")
    path = folder / "config.json"
    config = {
        "models": {"tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))}},
        "prompts_dir": "prompts",
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "faithfulness", "--config", str(config), "--prompt", TEXT, *argv)


def test_cli_json(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    code, out, err = cli(
        capsys,
        config_file,
        "--threshold",
        "0.02",
        "--target",
        "w3",
        "--distractor",
        "w7",
        "--seeds",
        "3",
    )
    assert (code, err) == (0, "")
    data: dict[str, Any] = json.loads(out)
    assert data["metric"] == "logit_diff" and data["mode"] == "mean"
    assert data["mean_prompts"].endswith("factual.txt")  # the default file in prompts_dir
    for key in ("route", "complement", "route_heads"):
        assert set(data[key]) == {"ablated_heads", "ablated_ffn", "value", "share"}
    random = data["random_heads"]
    assert len(random["values"]) == 3 and random["seeds"] == [0, 1, 2]
    assert math.isfinite(random["share_mean"]) and random["share_sd"] >= 0
    assert random["ablated_heads"] == data["route_heads"]["ablated_heads"]
    assert data["components"]["heads_on_route"] == data["complement"]["ablated_heads"]
    assert data["full"] == pytest.approx(data["route"]["value"] / data["route"]["share"], rel=1e-6)


def test_cli_no_renormalize(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    base = ("--threshold", "0.02", "--mode", "zero", "--seeds", "1")
    code, out, err = cli(capsys, config_file, *base, "--no-renormalize")
    assert (code, err) == (0, "")
    raw: dict[str, Any] = json.loads(out)
    code, out, err = cli(capsys, config_file, *base)
    assert (code, err) == (0, "")
    scaled: dict[str, Any] = json.loads(out)
    assert raw["renormalize"] is False and scaled["renormalize"] is True
    assert raw["components"] == scaled["components"]  # the same components either way


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--distractor", "w7"), "--distractor needs --target"),
        (("--seeds", "0"), "--seeds must be at least 1"),
        (("--threshold", "2"), "threshold must be between 0 and 1"),
        (("--target", "w3 w4"), "is 2 tokens"),
        (("--position", "40"), "outside the prompt"),
    ],
)
def test_cli_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], config_file: Path, argv: tuple[str, ...], needle: str
) -> None:
    code, out, err = cli(capsys, config_file, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("llm-flow: error: ")
    assert needle in err
