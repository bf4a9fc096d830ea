"""Ablating routed experts and whole mixture-of-experts blocks (llm_flow/analyses/interventions.py).

Checked against independent computations: zeroing an expert's output weights in a copy of the
HF model, and the first layer's FFN update minus (or plus) the exact expert parts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_flow.analyses.ablation import ablated_logits, ablated_trace
from llm_flow.analyses.interventions import (
    Ablation,
    ExpertRef,
    FfnRef,
    InterventionError,
    MeanActivations,
    NeuronRef,
    mean_activations,
    parse_experts,
    validate,
)
from llm_flow.engine.trace import trace
from llm_flow.models.bridge import BridgeLlm
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny, f32_tol
from tests.tiny import prompt, tiny_hf_model, tiny_llm, tiny_tokenizer

TEXT = prompt(9, seed=4)


@pytest.fixture(scope="module")
def moe() -> BridgeLlm:
    return tiny_llm("qwen2-moe")


@pytest.fixture(scope="module")
def means(moe: BridgeLlm) -> MeanActivations:
    return mean_activations(moe, [prompt(6, seed) for seed in (1, 2)])


def _expert_part(run, layer: int, expert: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Expert ``expert``'s part of the FFN update of ``layer`` at every token → [T, D]."""
    lr = run.layers[layer]
    parts = lr.experts.slot_outputs() * lr.mlp_scale.float()[:, None, None]  # [T, k, D]
    return (parts * (lr.experts.index == expert)[..., None]).sum(1)


def test_zero_ablating_an_expert_equals_removing_its_output_weights(moe: BridgeLlm) -> None:
    plain = moe.run(TEXT)
    expert = int(plain.layers[1].experts.index[3, 0])  # routed to at token 3
    hf = tiny_hf_model("qwen2-moe")
    with torch.no_grad():
        hf.model.layers[1].mlp.experts.down_proj[expert] = 0
    without = BridgeLlm("without", hf, tiny_tokenizer())
    got = ablated_logits(moe, moe.tokenize(TEXT), Ablation(experts=(ExpertRef(1, expert),)))
    want = without.run(TEXT).logits
    tol = f32_tol(max(1.0, float(want.abs().max())), terms=3 * 128)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    # The comparison can fail: the expert was routed to, so the logits moved.
    assert float((got - plain.logits).abs().max()) > 10 * tol


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_an_ablated_expert_loses_exactly_its_part(
    moe: BridgeLlm, means: MeanActivations, mode: str
) -> None:
    plain = moe.run(TEXT)
    expert = int(plain.layers[0].experts.index[3, 0])  # chosen at token 3
    ablation = Ablation(experts=(ExpertRef(0, expert),), mode=mode)  # type: ignore[arg-type]
    after = ablated_trace(trace(moe, TEXT), ablation, means).run  # self-checks hold
    want = plain.layers[0].mlp_update.float() - _expert_part(plain, 0, expert)
    if mode == "mean":
        assert means.experts is not None
        want = want + means.experts[0, expert]
    tol = f32_tol(float(plain.layers[0].mlp_update.abs().max()), terms=64)
    torch.testing.assert_close(after.layers[0].mlp_update.float(), want, rtol=0, atol=tol)
    assert float(_expert_part(plain, 0, expert).abs().max()) > 10 * tol


def test_the_mean_expert_part_averages_every_position(moe: BridgeLlm) -> None:
    prompts = [prompt(6, seed) for seed in (1, 2)]
    got = mean_activations(moe, prompts)
    runs = [moe.run(p) for p in prompts]
    n = sum(r.n_tokens for r in runs)
    assert got.experts is not None and got.ffn is not None
    for e in range(moe.info.n_experts):
        want = sum(_expert_part(r, 2, e).sum(0) for r in runs) / n
        torch.testing.assert_close(got.experts[2, e], want, rtol=0, atol=1e-6)
    ffn = sum(r.layers[1].mlp_update.sum(0) for r in runs) / n
    torch.testing.assert_close(got.ffn[1], ffn, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_a_moe_block_replaces_its_whole_update(
    moe: BridgeLlm, means: MeanActivations, mode: str
) -> None:
    ablation = Ablation(ffn=(FfnRef(0, position=4),), mode=mode)  # type: ignore[arg-type]
    plain = moe.run(TEXT)
    after = ablated_trace(trace(moe, TEXT), ablation, means).run
    update = after.layers[0].mlp_update.float()
    assert means.ffn is not None
    replaced = torch.zeros_like(update[4]) if mode == "zero" else means.ffn[0]
    torch.testing.assert_close(update[4], replaced, rtol=0, atol=1e-6)
    rest = torch.arange(plain.n_tokens) != 4
    torch.testing.assert_close(update[rest], plain.layers[0].mlp_update[rest].float())


def test_experts_parse_and_validate_against_the_model(moe: BridgeLlm) -> None:
    assert parse_experts("0.1, 2.3") == (ExpertRef(0, 1), ExpertRef(2, 3))
    with pytest.raises(InterventionError, match="LAYER.EXPERT"):
        parse_experts("0-1")
    with pytest.raises(InterventionError, match="experts 0..3"):
        validate(Ablation(experts=(ExpertRef(0, 4),)), moe.info, 5)
    with pytest.raises(InterventionError, match="no dense neurons"):
        validate(Ablation(neurons=(NeuronRef(0, 1),)), moe.info, 5)


def test_a_dense_model_has_no_experts_to_ablate() -> None:
    dense = tiny_llm("llama-gqa")
    with pytest.raises(InterventionError, match="dense FFN.*the model is dense"):
        validate(Ablation(experts=(ExpertRef(0, 1),)), dense.info, 5)


def test_cli_ablates_experts_and_reports_bad_ones_in_one_line(
    capsys: pytest.CaptureFixture[str], saved_tiny: SavedTiny, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    models = {"moe": {"source": "local", "path": str(saved_tiny("qwen2-moe"))}}
    config.write_text(json.dumps({"models": models}), encoding="utf-8")
    base = ("ablate", "--config", str(config), "--prompt", TEXT)
    code, out, err = run_cli(capsys, *base, "--experts", "1.2,2.0")
    assert code == 0, err
    data = json.loads(out)
    assert data["ablated"]["experts"] == ["1.2", "2.0"]
    assert data["before"]["top"] != data["after"]["top"]
    for bad, message in (("1.9", "experts 0..3"), ("x", "LAYER.EXPERT")):
        code, out, err = run_cli(capsys, *base, "--experts", bad)
        assert code == 2 and out == "" and message in err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, *base, "--neurons", "0.3")
    assert code == 2 and "no dense neurons" in err
