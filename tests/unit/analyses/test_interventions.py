"""Tests for llm_flow/analyses/interventions.py, analyses/ablation.py and ``llm-flow ablate``.

Ablation through hooks is compared with independent hand computations: zeroing a head's or a
neuron's output *weights* in a copy of the model, and the attention update minus the exact part
an edge carried.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_flow.analyses.ablation import ablate, ablated_logits
from llm_flow.analyses.interventions import (
    Ablation,
    EdgeRef,
    FfnRef,
    HeadRef,
    InterventionError,
    NeuronRef,
    ablation_hooks,
    mean_activations,
    parse_edges,
    parse_heads,
    parse_neurons,
    validate,
)
from llm_flow.engine.trace import trace
from llm_flow.models.bridge import BridgeLlm
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny, f32_tol
from tests.tiny import prompt, tiny_hf_model, tiny_llm, tiny_tokenizer

D_HEAD = 8


@pytest.fixture(scope="module")
def llama() -> BridgeLlm:
    return tiny_llm("llama-gqa")


@pytest.fixture(scope="module")
def gemma() -> BridgeLlm:
    return tiny_llm("gemma3-postnorm")


def without_head(arch: str, layer: int, head: int) -> BridgeLlm:
    """The same tiny model with head ``head``'s slice of W_O zeroed in the HF weights."""
    hf = tiny_hf_model(arch)
    cols = slice(head * D_HEAD, (head + 1) * D_HEAD)
    with torch.no_grad():
        if arch == "gpt2-bias":
            hf.transformer.h[layer].attn.c_proj.weight[cols, :] = 0  # Conv1D: [in, out]
        elif arch == "neox-parallel":
            hf.gpt_neox.layers[layer].attention.dense.weight[:, cols] = 0
        else:
            hf.model.layers[layer].self_attn.o_proj.weight[:, cols] = 0
    return BridgeLlm(arch, hf, tiny_tokenizer())


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2-bias", "gemma3-postnorm", "neox-parallel"])
def test_zero_ablating_a_head_equals_removing_its_output_weights(arch: str) -> None:
    llm = tiny_llm(arch)
    ids = llm.tokenize(prompt(6))
    got = ablated_logits(llm, ids, Ablation(heads=(HeadRef(1, 2),)))
    want = without_head(arch, 1, 2).logits_with_hooks(ids, [])
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - llm.logits_with_hooks(ids, [])).abs().max() > 1e-4  # the head mattered


def test_zero_ablating_a_neuron_equals_removing_its_output_row() -> None:
    llm = tiny_llm("llama-gqa")
    ids = llm.tokenize(prompt(6))
    hf = tiny_hf_model("llama-gqa")
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[:, 7] = 0
    want = BridgeLlm("llama-gqa", hf, tiny_tokenizer()).logits_with_hooks(ids, [])
    got = ablated_logits(llm, ids, Ablation(neurons=(NeuronRef(0, 7),)))
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - llm.logits_with_hooks(ids, [])).abs().max() > 1e-5


def test_head_ablation_at_one_position_changes_the_update_there_only(llama: BridgeLlm) -> None:
    """Pre-norm: zeroing head h at query t changes attention's update by exactly −head_update."""
    from llm_flow.analyses.lens import head_update

    text = prompt(6)
    run = llama.run(text)
    captured: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor, hook: Any) -> None:
        captured["attn"] = tensor[0].detach().clone()

    ablation = validate(Ablation(heads=(HeadRef(2, 1, position=4),)), llama.info, run.n_tokens)
    hooks = ablation_hooks(llama, ablation, run.n_tokens)
    llama.logits_with_hooks(run.token_ids, [*hooks, ("blocks.2.hook_attn_out", grab)])
    change = captured["attn"] - run.layers[2].attn_update
    assert torch.allclose(change[4], -head_update(run, 2, 1, 4), atol=1e-6)
    assert torch.all(change[torch.arange(run.n_tokens) != 4] == 0)


def test_ablating_nothing_is_the_unablated_model(llama: BridgeLlm) -> None:
    ids = llama.tokenize(prompt(6))
    assert torch.equal(ablated_logits(llama, ids, Ablation()), llama.logits_with_hooks(ids, []))
    result = ablate(trace(llama, prompt(6)), Ablation(mode="mean"), target_id=5, distractor_id=6)
    # The trace's capture hooks and the ablation's pass may sum in other orders (one thread vs
    # two gave logits a last bit apart): same tokens, probabilities and logit difference within
    # float32 rounding of the tiny model's layers (sums of up to 3·128 terms).
    before, after = result.before, result.after
    assert [t.id for t in after.top] == [t.id for t in before.top]
    for b, a in zip(before.top, after.top, strict=True):
        assert a.prob == pytest.approx(b.prob, rel=f32_tol(terms=3 * 128), abs=0)
    assert before.logit_diff is not None and after.logit_diff is not None
    assert after.logit_diff == pytest.approx(before.logit_diff, abs=f32_tol(10.0, terms=3 * 128))


def test_mean_of_a_single_position_prompt_changes_nothing(llama: BridgeLlm) -> None:
    ids = llama.tokenize(prompt(1))[-1:]  # one token: its mean is itself
    means = mean_activations(llama, [ids])
    everything = Ablation(
        heads=tuple(HeadRef(layer, h) for layer in range(3) for h in range(4)),
        ffn=tuple(FfnRef(layer) for layer in range(3)),
        mode="mean",
    )
    base = llama.logits_with_hooks(ids, [])
    assert torch.allclose(ablated_logits(llama, ids, everything, means), base, atol=1e-6)
    # Not vacuous: the means of another prompt do change it.
    other = mean_activations(llama, [prompt(5, seed=3)])
    assert (ablated_logits(llama, ids, everything, other) - base).abs().max() > 1e-3


def test_mean_activations_average_every_position(llama: BridgeLlm) -> None:
    prompts = [prompt(3, seed=1), prompt(5, seed=2)]
    means = mean_activations(llama, prompts, source="x")
    runs = [llama.run(p) for p in prompts]
    acts = torch.cat([r.layers[1].neuron_acts for r in runs])  # [ΣT, N]
    assert means.n_positions == acts.shape[0] == 4 + 6
    assert torch.allclose(means.post[1], acts.mean(0), atol=1e-6)
    assert means.z.shape == (3, 4, D_HEAD)


def test_zero_weight_edge_changes_nothing_while_a_real_one_does(gemma: BridgeLlm) -> None:
    """Gemma 3's sliding window (4 tokens here) gives exact zero pattern entries far back."""
    run = gemma.run(prompt(6))
    assert torch.all(run.layers[0].pattern[:, 6, 0] == 0)
    base = gemma.logits_with_hooks(run.token_ids, [])
    dead = ablated_logits(gemma, run.token_ids, Ablation(edges=(EdgeRef(0, 0, 6),)))
    assert torch.equal(dead, base)
    live = ablated_logits(gemma, run.token_ids, Ablation(edges=(EdgeRef(0, 5, 6),)))
    assert (live - base).abs().max() > 1e-4


def test_edge_ablation_removes_exactly_the_edge_part(llama: BridgeLlm) -> None:
    run = llama.run(prompt(6))
    u = run.layers[1].head_outputs()  # [S, H, D]
    pattern = run.layers[1].pattern
    assert pattern is not None
    captured: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor, hook: Any) -> None:
        captured["attn"] = tensor[0].detach().clone()

    for edge, heads in ((EdgeRef(1, 2, 5), slice(None)), (EdgeRef(1, 2, 5, head=3), [3])):
        checked = validate(Ablation(edges=(edge,)), llama.info, run.n_tokens)
        hooks = ablation_hooks(llama, checked, run.n_tokens)
        llama.logits_with_hooks(run.token_ids, [*hooks, ("blocks.1.hook_attn_out", grab)])
        part = (pattern[heads, 5, 2, None] * u[2, heads]).sum(0)  # [D]
        change = captured["attn"] - run.layers[1].attn_update
        assert torch.allclose(change[5], -part, atol=1e-6)
        assert torch.all(change[:5] == 0)


# -- parsing and validation -------------------------------------------------------------------


def test_parsers_read_the_cli_forms() -> None:
    assert parse_heads("3.1, 12.0") == (HeadRef(3, 1), HeadRef(12, 0))
    assert parse_neurons("5.120") == (NeuronRef(5, 120),)
    assert parse_edges("3:1>4,2.7:0>-1") == (EdgeRef(3, 1, 4), EdgeRef(2, 0, -1, head=7))
    assert parse_heads("") == ()


@pytest.mark.parametrize(
    ("parse", "text"), [(parse_heads, "3"), (parse_neurons, "a.b"), (parse_edges, "3:1-4")]
)
def test_parsers_reject_bad_syntax_with_an_example(parse: Any, text: str) -> None:
    with pytest.raises(InterventionError, match="e.g."):
        parse(text)


@pytest.mark.parametrize(
    ("ablation", "needle"),
    [
        (Ablation(heads=(HeadRef(3, 0),)), "layer 3 in '3.0' is out of range"),
        (Ablation(heads=(HeadRef(0, 4),)), "head 4 in '0.4' is out of range"),
        (Ablation(neurons=(NeuronRef(0, 48),)), "neuron 48"),
        (Ablation(edges=(EdgeRef(0, 5, 2),)), "SOURCE must be ≤ TARGET"),
        (Ablation(edges=(EdgeRef(0, 0, 9),)), "outside the prompt's 7 tokens"),
    ],
)
def test_validation_names_the_valid_ranges(
    llama: BridgeLlm, ablation: Ablation, needle: str
) -> None:
    with pytest.raises(InterventionError) as info:
        validate(ablation, llama.info, 7)
    assert needle in str(info.value)
    if "range" in needle:
        assert "layers 0..2, heads 0..3 and neurons 0..47" in str(info.value)


def test_negative_positions_are_normalized(llama: BridgeLlm) -> None:
    checked = validate(Ablation(edges=(EdgeRef(0, -3, -1),)), llama.info, 7)
    assert checked.edges == (EdgeRef(0, 4, 6),)


def test_mean_mode_without_means_is_an_error(llama: BridgeLlm) -> None:
    with pytest.raises(InterventionError, match="mean activations"):
        ablated_logits(llama, [0, 5, 6], Ablation(heads=(HeadRef(0, 0),), mode="mean"))


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_file(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ablate-cli")
    path = folder / "config.json"
    config = {"models": {"tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))}}}
    path.write_text(json.dumps(config), encoding="utf-8")
    (folder / "means.txt").write_text(f"{prompt(4, 1)}\n{prompt(6, 2)}\n", encoding="utf-8")
    return path


def cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "ablate", "--config", str(config), "--prompt", prompt(6), *argv)


def check_outcome(data: dict[str, Any], with_diff: bool) -> None:
    assert len(data["top"]) == 5
    for row in data["top"]:
        assert set(row) == {"token", "id", "prob"}
        assert type(row["id"]) is int and 0 < row["prob"] <= 1
    probs = [row["prob"] for row in data["top"]]
    assert probs == sorted(probs, reverse=True)
    assert (type(data["logit_diff"]) is float) if with_diff else data["logit_diff"] is None


def test_ablate_json_before_and_after(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, err = cli(
        capsys, config_file, "--heads", "1.2,2.0", "--neurons", "0.3", "--edges", "1:0>6"
    )
    assert (code, err) == (0, "")
    data = json.loads(out)
    check_outcome(data["before"], with_diff=False)
    check_outcome(data["after"], with_diff=False)
    assert data["ablated"]["heads"] == ["1.2", "2.0"] and data["ablated"]["edges"] == ["1:0>6"]
    llm = tiny_llm("llama-gqa")
    want = llm.run(prompt(6)).logits[-1].softmax(-1).topk(5)
    assert [r["id"] for r in data["before"]["top"]] == want.indices.tolist()
    assert data["before"]["top"] != data["after"]["top"]


def test_ablate_with_target_and_mean_prompts(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    means = str(config_file.parent / "means.txt")
    code, out, err = cli(
        capsys,
        config_file,
        "--heads",
        "1.2",
        "--mode",
        "mean",
        "--mean-prompts",
        means,
        "--target",
        "w3",
        "--distractor",
        "w7",
    )
    assert (code, err) == (0, "")
    data = json.loads(out)
    check_outcome(data["before"], with_diff=True)
    check_outcome(data["after"], with_diff=True)
    assert data["ablated"]["mode"] == "mean" and data["ablated"]["mean_prompts"] == means
    llm = tiny_llm("llama-gqa")
    logits = llm.run(prompt(6)).logits[-1]
    a, b = llm.tokenize_unchecked("w3")[-1], llm.tokenize_unchecked("w7")[-1]
    assert data["before"]["logit_diff"] == pytest.approx(float(logits[a] - logits[b]), abs=1e-5)
    assert data["after"]["logit_diff"] != pytest.approx(data["before"]["logit_diff"], abs=1e-6)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--heads", "9.0"), "layers 0..2"),
        (("--heads", "x"), "LAYER.HEAD"),
        (("--neurons", "0.999"), "neurons 0..47"),
        (("--edges", "0:5>1"), "SOURCE must be ≤ TARGET"),
        ((), "nothing to ablate"),
        (("--heads", "0.0", "--mode", "mean"), "--mean-prompts"),
        (("--heads", "0.0", "--target", "w3"), "go together"),
        (("--heads", "0.0", "--mode", "mean", "--mean-prompts", "/nonexistent.txt"), "cannot read"),
    ],
)
def test_ablate_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], config_file: Path, argv: tuple[str, ...], needle: str
) -> None:
    code, out, err = cli(capsys, config_file, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("llm-flow: error: ")
    assert needle in err
