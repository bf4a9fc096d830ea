"""Every supported decoder family, as a tiny random model: the bridge runs exactly the HF model,
every self-check identity holds, and the engine equals the slow reference.

Mixture-of-experts families are also checked part by part against HF's own experts module,
called with one routing slot at a time — an implementation independent of llm-flow's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from llm_flow.analyses.ablation import ablated_logits, ablated_trace
from llm_flow.analyses.interventions import Ablation, EdgeRef, ExpertRef, HeadRef
from llm_flow.analyses.lens import expert_update, head_update
from llm_flow.engine.contributions import layer_contributions
from llm_flow.engine.trace import trace
from llm_flow.errors import InterventionError
from llm_flow.models import wrap_hf
from llm_flow.models.base import ModelRun
from llm_flow.models.bridge import BridgeLlm
from llm_flow.models.checks import relative_error
from llm_flow.models.experts import find_moe, unwrapped
from llm_flow.models.plain import plain_model
from llm_flow.models.support import TESTED_ARCHITECTURES
from tests.conftest import f32_tol
from tests.families import FAMILIES
from tests.reference import layer_kwargs64, slow_attention_contributions
from tests.tiny import prompt, random_model, tiny_tokenizer

PROMPT = prompt(9)  # 10 tokens with BOS: longer than the sliding windows of 4
# float32 end to end through two small layers: a few hundred roundings of values of size ~1.
RTOL = f32_tol(terms=3 * 128)
# Families whose attention TransformerLens delegates to the HF module, firing hook_pattern after
# the fact: a pattern edit cannot reach the output (measured; see edits_pattern).
PATTERN_NOT_EDITABLE = {"GPT-J", "OPT"}
# MLA: an unwrapped skeleton over the bridged model's tensors does not run (measured), so bench's
# baseline is the bridge's pass without hooks.
PLAIN_UNAVAILABLE = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}


@dataclass(frozen=True)
class Case:
    hf: Any
    llm: BridgeLlm
    run: ModelRun
    hf_out: Any


@functools.cache
def _case(name: str) -> Case:
    hf = random_model(FAMILIES[name].config())
    llm = wrap_hf(name, hf, tiny_tokenizer(), device="cpu", dtype=torch.float32)
    run = llm.run(PROMPT)
    with torch.no_grad():
        hf_out = hf(torch.tensor([run.token_ids]), output_hidden_states=True)
    return Case(hf, llm, run, hf_out)


@pytest.fixture(params=list(FAMILIES))
def case(request: pytest.FixtureRequest) -> Case:
    return _case(request.param)


@pytest.fixture(params=[name for name, family in FAMILIES.items() if family.experts])
def moe_case(request: pytest.FixtureRequest) -> Case:
    return _case(request.param)


def test_the_matrix_is_the_list_of_tested_architectures() -> None:
    built = {type(random_model(f.config())).__name__ for f in FAMILIES.values()}
    assert built == set(TESTED_ARCHITECTURES)


def test_logits_and_residuals_are_the_hf_models(case: Case) -> None:
    assert relative_error(case.run.logits, case.hf_out.logits[0]) <= RTOL
    hidden = case.hf_out.hidden_states
    for layer in case.run.layers:
        assert relative_error(layer.resid_pre, hidden[layer.index][0]) <= RTOL
    # The comparison can fail: logits differ between positions.
    assert not torch.allclose(case.run.logits[0], case.run.logits[-1], atol=1e-3)


def test_the_plain_forward_is_the_hf_model_on_the_same_tensors(case: Case) -> None:
    # bench's baseline: the unhooked transformers forward, sharing every weight (no copy).
    logits = case.llm.plain_logits(case.run.token_ids)
    assert relative_error(logits, case.hf_out.logits[0]) <= RTOL
    built = plain_model(case.hf)
    # The bridged model is untouched (the skeleton once switched the shared config to sdpa, and
    # GPT-J's and OPT's delegated attention then stopped returning their patterns).
    again = case.llm.run(case.run.token_ids)
    assert torch.equal(again.layers[-1].pattern, case.run.layers[-1].pattern)
    if case.llm.info.architecture in PLAIN_UNAVAILABLE:  # the bridge's pass stands in, said so
        assert built is None and case.llm.plain_attention == "hooked model, no hooks"
        return
    assert built is not None
    plain, attention = built
    assert case.llm.plain_attention == f"transformers, {attention} attention"
    assert not any("transformer_lens" in type(m).__module__ for m in plain.modules())
    wrapped = {t.data_ptr() for t in case.hf.state_dict().values()}
    assert {t.data_ptr() for t in plain.state_dict().values()} <= wrapped


def test_the_lens_of_the_last_residual_gives_the_logits(case: Case) -> None:
    # Multipliers (Granite's logits_scaling) and softcaps (Gemma 2) live after the unembedding;
    # compare where the model applies none.
    final_softcap = getattr(case.hf.config, "final_logit_softcapping", None)
    if final_softcap:
        case.hf.config.final_logit_softcapping = None
    try:
        with torch.no_grad():
            plain = case.hf(torch.tensor([case.run.token_ids])).logits[0]
    finally:
        case.hf.config.final_logit_softcapping = final_softcap
    lens = case.llm.unembed(case.run.layers[-1].resid_post)
    assert relative_error(lens, plain) <= RTOL


def _heads(layer: Any) -> Tensor:
    mixed = torch.einsum("hts,shk->thk", layer.pattern.double(), layer.values.double())
    out = torch.einsum("thk,hkd->td", mixed, layer.W_O.double()) + layer.b_O.double()
    return out * layer.attn_scale.double()[:, None]


def test_every_self_check_identity_holds(case: Case) -> None:
    for layer in case.run.layers:
        assert relative_error(_heads(layer), layer.attn_update) <= RTOL
        neurons = layer.neuron_acts.double() @ layer.W_out.double() + layer.b_out.double()
        if layer.experts is not None:
            neurons = neurons + layer.experts.total(torch.float64)
        ffn = neurons * layer.mlp_scale.double()[:, None]
        assert relative_error(ffn, layer.mlp_update) <= RTOL
        base = layer.resid_pre.double() + layer.attn_update.double()
        if layer.resid_mid is not None:
            assert relative_error(base, layer.resid_mid) <= RTOL
        assert relative_error(base + layer.mlp_update.double(), layer.resid_post) <= RTOL


def test_engine_matches_the_slow_reference(case: Case) -> None:
    tol = f32_tol()  # float64 on both sides; only the engine's final float32 cast rounds
    for layer in case.run.layers:
        c = layer_contributions(**layer_kwargs64(layer))  # type: ignore[arg-type]
        slow = slow_attention_contributions(layer)
        n = c.attention.shape[0]
        torch.testing.assert_close(c.attention.double(), slow[:, :n], atol=tol, rtol=0)
        torch.testing.assert_close(c.attn_residual.double(), slow[:, n], atol=tol, rtol=0)


def test_moe_layers_are_exactly_the_blocks_with_experts(case: Case) -> None:
    assert bool(case.llm.info.moe_layers) == FAMILIES[case.llm.info.name].experts
    blocks = case.llm._bridge.blocks
    expected = [i for i, b in enumerate(blocks) if find_moe(unwrapped(b.mlp)) is not None]
    assert list(case.llm.info.moe_layers) == expected
    for layer in case.run.layers:
        assert (layer.experts is not None) == (layer.index in expected)
        if layer.experts is not None:
            assert layer.neuron_acts.shape[1] == 0
            k = case.llm.info.experts_per_token
            assert layer.experts.index.shape == (case.run.n_tokens, k)


def test_each_expert_part_is_hf_experts_module_called_with_that_slot_alone(
    moe_case: Case,
) -> None:
    case = moe_case
    for layer in case.run.layers:
        if layer.experts is None:
            continue
        module = find_moe(unwrapped(case.llm._bridge.blocks[layer.index].mlp))
        assert module is not None
        ex = layer.experts
        x = _moe_input(case, layer.index)
        scale = layer.mlp_scale.double()[:, None]
        moe = case.llm._moe[layer.index]
        fold = 1.0 if moe.fold is None else moe.fold.double()
        parts = ex.slot_outputs(torch.float64)
        for slot in range(ex.index.shape[1]):
            with torch.no_grad():
                hf_part = module(x, ex.index[:, slot : slot + 1], ex.weight[:, slot : slot + 1])
            assert relative_error(parts[:, slot] * scale, hf_part.double() * fold) <= RTOL
        assert (ex.weight >= 0).all()


def _moe_input(case: Case, layer: int) -> Tensor:
    """The normalized residual the MoE block of ``layer`` read, from a fresh HF pass."""
    block = unwrapped(case.llm._bridge.blocks[layer].mlp)
    seen: list[Tensor] = []
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            case.hf(torch.tensor([case.run.token_ids]))
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_attention_sinks_keep_their_share_of_the_softmax() -> None:
    """GPT-OSS: each head's sink takes part of the softmax and writes nothing; the pattern
    keeps exactly HF's probabilities of the tokens, so its rows sum to 1 − the sink's share."""
    case = _case("GPT-OSS")
    sinks = [layer.sink_share() for layer in case.run.layers]
    assert all(s is not None and float(s.min()) > 0.01 for s in sinks)  # randomized sinks
    hf = random_model(FAMILIES["GPT-OSS"].config())
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        out = hf(torch.tensor([case.run.token_ids]), output_attentions=True)
    for layer, probs in zip(case.run.layers, out.attentions, strict=True):
        assert layer.pattern is not None
        n = case.run.n_tokens
        torch.testing.assert_close(layer.pattern, probs[0, :, :, :n], rtol=0, atol=RTOL)
    dense = _case("Llama 3").run.layers[0].sink_share()
    assert dense is not None and float(dense.max()) <= f32_tol(terms=case.run.n_tokens + 1)


def test_zero_ablating_a_head_removes_exactly_its_part(case: Case) -> None:
    """Through the z hook of every family (MLA's flat z included): in the first layer, whose
    input the ablation cannot change, the attention sum loses exactly head 1's part (a
    post-norm then rescales the new sum: its new 1/rms is the ablated run's attn_scale)."""
    llm, plain = case.llm, case.run
    after = ablated_trace(trace(llm, PROMPT), Ablation(heads=(HeadRef(0, 1),))).run
    first, ablated = plain.layers[0], after.layers[0]
    head = torch.stack([head_update(plain, 0, 1, t) for t in range(plain.n_tokens)])
    old_scale, new_scale = first.attn_scale.float()[:, None], ablated.attn_scale.float()[:, None]
    want = (first.attn_update.float() - head) / old_scale * new_scale
    tol = f32_tol(float(first.attn_update.abs().max()), terms=128)
    torch.testing.assert_close(ablated.attn_update.float(), want, rtol=0, atol=tol)
    assert float(head.abs().max()) > 10 * tol


def test_zero_ablating_an_expert_removes_exactly_its_part(moe_case: Case) -> None:
    """Through the routing hook of every MoE family: in the first MoE layer the FFN update
    loses exactly the ablated expert's part (upstream of it nothing changed)."""
    llm, plain = moe_case.llm, moe_case.run
    layer = llm.info.moe_layers[0]
    ex = plain.layers[layer].experts
    assert ex is not None
    expert = int(ex.index[-1, 0])
    after = ablated_trace(trace(llm, PROMPT), Ablation(experts=(ExpertRef(layer, expert),))).run
    want = plain.layers[layer].mlp_update.float() - torch.stack(
        [expert_update(plain, layer, expert, t) for t in range(plain.n_tokens)]
    )
    tol = f32_tol(float(plain.layers[layer].mlp_update.abs().max()), terms=128)
    torch.testing.assert_close(after.layers[layer].mlp_update.float(), want, rtol=0, atol=tol)
    assert float((want - plain.layers[layer].mlp_update.float()).abs().max()) > 10 * tol


def test_an_edge_cut_removes_exactly_the_edge_part_or_is_refused(case: Case) -> None:
    """Edge ablation edits the pattern. Where TransformerLens cannot feed an edited pattern
    back into the model (its generic attention: GPT-J, OPT), it is refused in words instead of
    silently doing nothing."""
    llm, plain = case.llm, case.run
    ablation = Ablation(edges=(EdgeRef(0, 4, 6),))  # inside every sliding window of 4
    if not llm.edits_pattern():
        assert case.llm.info.name in PATTERN_NOT_EDITABLE
        with pytest.raises(InterventionError, match="edges cannot be ablated"):
            ablated_logits(llm, list(plain.token_ids), ablation)
        return
    assert case.llm.info.name not in PATTERN_NOT_EDITABLE
    after = ablated_trace(trace(llm, PROMPT), ablation).run
    first, ablated = plain.layers[0], after.layers[0]
    assert first.pattern is not None
    part = torch.einsum(
        "h,hk,hkd->d", first.pattern[:, 6, 4].float(), first.values[4].float(), first.W_O.float()
    )
    old_scale, new_scale = first.attn_scale.float(), ablated.attn_scale.float()
    want = (first.attn_update[6].float() - part * old_scale[6]) / old_scale[6] * new_scale[6]
    tol = f32_tol(float(first.attn_update.abs().max()), terms=128)
    torch.testing.assert_close(ablated.attn_update[6].float(), want, rtol=0, atol=tol)
    assert float(part.abs().max()) > 10 * tol
