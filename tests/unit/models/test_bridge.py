"""Tests for llm_flow/models/bridge.py: BridgeLlm over TransformerLens's TransformerBridge.

Every tiny architecture (GQA, biases, post-norms, parallel blocks) is compared with a *separate*
instance of the same Hugging Face model (same seed, never wrapped by the bridge): logits, hidden
states, attention patterns and weights. The decomposition identities are recomputed here in
float64, independently of ``llm_flow.models.checks``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import processors
from torch import Tensor
from transformers import AutoTokenizer

from llm_flow.errors import PromptError
from llm_flow.models.base import LayerRun, ModelRun
from llm_flow.models.bridge import BridgeLlm
from tests.conftest import f32_tol
from tests.tiny import ARCHS, WORDS, prompt, tiny_hf_model, tiny_tokenizer

# Relative to the largest entry: float32 results that are sums of ≤ 128 terms (d_mlp) per layer
# through ≤ 3 layers, which TransformerLens and HF may add in different orders (worst case,
# 4.6e-5). It also covers the one-layer identities below, whose terms' absolute sum is at most
# ~6× the whole in these models (≤ 6·(T + 32) eps for the heads, 2.5·(128 + 2) eps for neurons).
RTOL = f32_tol(terms=3 * 128)
BOS = 0
PROMPT = prompt(9)  # 10 tokens with BOS: longer than gemma3-postnorm's sliding window of 4

# ModelInfo facts of each tiny config (tests/tiny.py), written out rather than read back.
EXPECTED_INFO: dict[str, dict[str, Any]] = {
    "llama-gqa": {"n_kv_heads": 2, "d_mlp": 48, "post_norm": False, "parallel_blocks": False},
    "gpt2-bias": {"n_kv_heads": 4, "d_mlp": 128, "post_norm": False, "parallel_blocks": False},
    "gemma3-postnorm": {"n_kv_heads": 1, "d_mlp": 48, "post_norm": True, "parallel_blocks": False},
    "neox-parallel": {"n_kv_heads": 4, "d_mlp": 48, "post_norm": False, "parallel_blocks": True},
    "qwen2-moe": {
        "n_kv_heads": 2,
        "post_norm": False,
        "parallel_blocks": False,
        "n_experts": 4,
        "experts_per_token": 2,
        "moe_layers": (0, 1, 2),
    },
}
DENSE_INFO = {"n_experts": 0, "experts_per_token": 0, "moe_layers": ()}


@dataclasses.dataclass
class Tiny:
    arch: str
    llm: BridgeLlm
    ref: Any  # the reference HF model: same weights, never touched by the bridge
    run: ModelRun
    hf_out: Any  # ref's output on run.token_ids (logits, hidden states, attentions)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest) -> Tiny:
    arch = request.param
    ref = tiny_hf_model(arch, seed=0)
    ref.set_attn_implementation("eager")  # so HF returns its attention probabilities
    llm = BridgeLlm(arch, tiny_hf_model(arch, seed=0), tiny_tokenizer())
    run = llm.run(PROMPT)
    with torch.no_grad():
        hf_out = ref(
            torch.tensor([run.token_ids]), output_hidden_states=True, output_attentions=True
        )
    return Tiny(arch, llm, ref, run, hf_out)


def rel_err(parts_sum: Tensor, whole: Tensor) -> float:
    whole = whole.double()
    return float((parts_sum.double() - whole).abs().max() / whole.abs().max())


def hf_layers(ref: Any) -> Any:
    """The decoder blocks of a tiny HF model, whatever the architecture names them."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = ref
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise AssertionError(f"no decoder blocks found in {type(ref).__name__}")


def no_bos_tokenizer(folder: Path) -> Any:
    """The tiny word-level tokenizer, but one that adds no BOS (like SmolLM2's)."""
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    tok.save_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded("w0 w1")["input_ids"] == [3, 4]
    return reloaded


# -- equivalence with the raw Hugging Face model ---------------------------------------------------


def test_logits_equal_hf_logits(tiny: Tiny) -> None:
    ref_logits = tiny.hf_out.logits[0]
    assert tiny.run.logits.shape == (len(tiny.run.token_ids), 64)
    assert rel_err(tiny.run.logits, ref_logits) <= RTOL
    # The same bound in absolute terms, taking logits of size < 1 as 1.
    scale = max(1.0, float(ref_logits.abs().max()))
    assert (tiny.run.logits - ref_logits).abs().max() <= RTOL * scale
    # The comparison can fail: logits differ between positions.
    assert not torch.allclose(ref_logits[0], ref_logits[-1], atol=1e-3)


def test_residuals_are_the_hf_hidden_states(tiny: Tiny) -> None:
    hidden = tiny.hf_out.hidden_states  # [embeddings, after layer 0, …]; the last one normed
    n_layers = tiny.run.n_layers
    assert len(hidden) == n_layers + 1
    for layer in tiny.run.layers:
        assert rel_err(layer.resid_pre, hidden[layer.index][0]) <= RTOL
        if layer.index < n_layers - 1:
            assert rel_err(layer.resid_post, hidden[layer.index + 1][0]) <= RTOL
    last = tiny.run.layers[-1].resid_post
    assert rel_err(tiny.llm.final_norm(last), hidden[-1][0]) <= RTOL


def test_patterns_are_the_hf_attention_probabilities(tiny: Tiny) -> None:
    n_tokens = len(tiny.run.token_ids)
    future = torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu(1)
    for layer in tiny.run.layers:
        assert layer.pattern is not None
        assert layer.pattern.shape == (4, n_tokens, n_tokens)
        # Probabilities ≤ 1 out of the forward pass: RTOL is an absolute bound here.
        assert (layer.pattern - tiny.hf_out.attentions[layer.index][0]).abs().max() <= RTOL
        # A float32 softmax row: ≤ T probabilities, their total and the test's sum all round.
        total, ones = layer.pattern.sum(-1), torch.ones(4, n_tokens)
        assert torch.allclose(total, ones, rtol=0, atol=f32_tol(terms=n_tokens + 1))
        assert (layer.pattern[:, future] == 0).all()


def test_unembed_of_last_residual_gives_the_logits(tiny: Tiny) -> None:
    last = tiny.run.layers[-1].resid_post
    assert rel_err(tiny.llm.unembed(last), tiny.run.logits) <= RTOL
    # The final norm as a linear map with the run's frozen scale differs from the norm itself
    # only by a constant (its bias; zero for RMS norms).
    linear = tiny.llm.final_norm_linear(last, tiny.run.final_scale)
    offset = tiny.llm.final_norm(last).double() - linear.double()
    # Two float32 evaluations of the norm; the scale comes from a D-term mean square: D eps.
    tol = f32_tol(float(linear.abs().max()), terms=tiny.llm.info.d_model)
    assert (offset - offset[0]).abs().max() <= tol


# -- the decomposition identities, recomputed here -------------------------------------------------


def test_residual_identities_hold_on_every_layer(tiny: Tiny) -> None:
    for layer in tiny.run.layers:
        if tiny.arch == "neox-parallel":
            whole = layer.resid_pre.double() + layer.attn_update.double()
            assert rel_err(whole + layer.mlp_update.double(), layer.resid_post) <= RTOL
        else:
            assert layer.resid_mid is not None
            mid = layer.resid_pre.double() + layer.attn_update.double()
            assert rel_err(mid, layer.resid_mid) <= RTOL
            post = layer.resid_mid.double() + layer.mlp_update.double()
            assert rel_err(post, layer.resid_post) <= RTOL


def test_heads_sum_to_the_attention_update_on_every_layer(tiny: Tiny) -> None:
    for layer in tiny.run.layers:
        assert layer.pattern is not None
        per_head = torch.einsum(
            "hts,shk,hkd->td",
            layer.pattern.double(),
            layer.values.double(),
            layer.W_O.double(),
        )
        scale = layer.attn_scale.double()[:, None]
        assert rel_err(per_head * scale + layer.b_O.double() * scale, layer.attn_update) <= RTOL


def test_neurons_or_experts_sum_to_the_mlp_update_on_every_layer(tiny: Tiny) -> None:
    for layer in tiny.run.layers:
        scale = layer.mlp_scale.double()[:, None]
        parts = layer.neuron_acts.double() @ layer.W_out.double() * scale
        if layer.experts is not None:
            assert layer.neuron_acts.shape[1] == 0
            parts = parts + layer.experts.total(torch.float64) * scale
        assert rel_err(parts + layer.b_out.double() * scale, layer.mlp_update) <= RTOL


def test_layer_shapes(tiny: Tiny) -> None:
    n_tokens, info = len(tiny.run.token_ids), tiny.llm.info
    for layer in tiny.run.layers:
        assert layer.values.shape == (n_tokens, info.n_heads, info.d_head)
        assert layer.W_O.shape == (info.n_heads, info.d_head, info.d_model)
        d_mlp = 0 if layer.experts is not None else info.d_mlp  # an MoE layer's parts: experts
        assert layer.W_out.shape == (d_mlp, info.d_model)
        assert layer.neuron_acts.shape == (n_tokens, d_mlp)
        assert layer.attn_scale.shape == layer.mlp_scale.shape == (n_tokens,)
        for bias in (layer.b_O, layer.b_out):
            assert isinstance(bias, Tensor)
            assert bias.shape == (info.d_model,)


# -- architecture specifics ------------------------------------------------------------------------


def test_biases_are_the_models_own(tiny: Tiny) -> None:
    blocks = hf_layers(tiny.ref)
    for layer in tiny.run.layers:
        block = blocks[layer.index]
        if tiny.arch == "gpt2-bias":
            expected = block.attn.c_proj.bias, block.mlp.c_proj.bias
        elif tiny.arch == "neox-parallel":
            expected = block.attention.dense.bias, block.mlp.dense_4h_to_h.bias
        else:  # bias-free: zeros, never None
            zeros = torch.zeros(32)
            expected = zeros, zeros
        assert torch.equal(layer.b_O, expected[0].detach())
        assert torch.equal(layer.b_out, expected[1].detach())
        if tiny.arch in ("gpt2-bias", "neox-parallel"):
            assert layer.b_O.abs().max() > 0  # the randomized biases really are non-zero


def test_gqa_values_are_the_kv_heads_repeated_per_query_head() -> None:
    llm = BridgeLlm("llama-gqa", tiny_hf_model("llama-gqa"), tiny_tokenizer())
    ref = tiny_hf_model("llama-gqa")
    run = llm.run(PROMPT)
    for layer in run.layers:
        block = ref.model.layers[layer.index]
        with torch.no_grad():
            v = block.self_attn.v_proj(block.input_layernorm(layer.resid_pre))
        kv = v.reshape(len(run.token_ids), 2, 8)  # [T, n_kv_heads, d_head]
        # Query heads 0, 1 share KV head 0; heads 2, 3 share KV head 1 (repeat_interleave).
        tol = RTOL * float(kv.abs().max())  # the forward-pass bound, relative to the largest
        for h in range(4):
            assert torch.allclose(layer.values[:, h], kv[:, h // 2], rtol=0, atol=tol)
        assert torch.equal(layer.values[:, 0], layer.values[:, 1])
        assert not torch.allclose(layer.values[:, 0], layer.values[:, 2])


def test_gemma3_folds_the_post_norm_gain_and_keeps_a_per_token_scale() -> None:
    llm = BridgeLlm("gemma3-postnorm", tiny_hf_model("gemma3-postnorm"), tiny_tokenizer())
    ref = tiny_hf_model("gemma3-postnorm")
    run = llm.run(PROMPT)
    assert llm.info.post_norm is True
    for layer in run.layers:
        block = ref.model.layers[layer.index]
        # Gemma's RMSNorm multiplies by (1 + w): that gain must sit in W_O / W_out.
        gain_attn = 1 + block.post_attention_layernorm.weight.detach()
        gain_mlp = 1 + block.post_feedforward_layernorm.weight.detach()
        # Per entry, a product: the gain read back from the norm's output (x·rsqrt(1 + ε)·g,
        # undone by √(1 + ε)), folded into W, against the test's W·(1 + w): ≤ 8 roundings.
        rtol = f32_tol(terms=8)
        raw_W_O = block.self_attn.o_proj.weight.detach().T.reshape(4, 8, 32)
        assert torch.allclose(layer.W_O, raw_W_O * gain_attn, rtol=rtol, atol=0)
        raw_W_out = block.mlp.down_proj.weight.detach().T
        assert torch.allclose(layer.W_out, raw_W_out * gain_mlp, rtol=rtol, atol=0)
        assert not torch.allclose(layer.attn_scale, torch.ones_like(layer.attn_scale))
        assert not torch.allclose(layer.mlp_scale, torch.ones_like(layer.mlp_scale))
        # All 4 query heads read the single KV head.
        for h in range(1, 4):
            assert torch.equal(layer.values[:, h], layer.values[:, 0])
        # Sliding window of 4: query 9 cannot see sources 0 … 5.
        assert layer.pattern is not None
        assert (layer.pattern[:, 9, :6] == 0).all()


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2-bias", "neox-parallel"])
def test_pre_norm_models_have_unit_scales(arch: str) -> None:
    run = BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer()).run(PROMPT)
    for layer in run.layers:
        assert torch.equal(layer.attn_scale, torch.ones_like(layer.attn_scale))
        assert torch.equal(layer.mlp_scale, torch.ones_like(layer.mlp_scale))


def test_parallel_blocks_have_no_resid_mid(tiny: Tiny) -> None:
    parallel = tiny.arch == "neox-parallel"
    assert tiny.llm.info.parallel_blocks is parallel
    assert tiny.run.parallel_blocks is parallel
    for layer in tiny.run.layers:
        assert (layer.resid_mid is None) is parallel
        if parallel:
            # resid_post − mlp_update against resid_pre + attn_update: the model's two float32
            # additions, this subtraction and the test's addition each round by ≤ eps/2 of
            # |resid_pre| + |attn| + |mlp|.
            size = layer.resid_pre.abs() + layer.attn_update.abs() + layer.mlp_update.abs()
            tol = f32_tol(float(size.max()), terms=2)
            expected = layer.resid_pre + layer.attn_update
            torch.testing.assert_close(layer.mlp_base, expected, rtol=0, atol=tol)
        else:
            assert layer.mlp_base is layer.resid_mid


def test_model_info(tiny: Tiny) -> None:
    expected = {
        "name": tiny.arch,
        "architecture": type(tiny.ref).__name__,
        "n_params": sum(p.numel() for p in tiny.ref.parameters()),
        "n_layers": 3,
        "n_heads": 4,
        "d_model": 32,
        "d_head": 8,
        "d_vocab": 64,
        "device": "cpu",
        "dtype": "float32",
        "prepends_bos": True,
        **DENSE_INFO,
        **EXPECTED_INFO[tiny.arch],
    }
    info = tiny.llm.info.to_dict()
    assert {k: info[k] for k in expected} == expected
    assert tiny.run.n_layers == 3


# -- run(): callbacks, patterns, immutability ------------------------------------------------------


def test_on_layer_is_called_once_per_layer_in_order(tiny: Tiny) -> None:
    seen: list[LayerRun] = []
    run = tiny.llm.run(PROMPT, on_layer=seen.append)
    assert [layer.index for layer in seen] == [0, 1, 2]
    assert all(layer.pattern is not None for layer in seen)
    for got, kept in zip(seen, run.layers, strict=True):
        assert torch.equal(got.resid_post, kept.resid_post)


def test_keep_patterns_false_drops_patterns_but_the_callback_still_sees_them(tiny: Tiny) -> None:
    seen: list[LayerRun] = []
    run = tiny.llm.run(PROMPT, on_layer=seen.append, keep_patterns=False)
    assert [layer.pattern for layer in run.layers] == [None, None, None]
    assert all(layer.pattern is not None for layer in seen)
    # Nothing else changes.
    assert torch.equal(run.logits, tiny.run.logits)
    for layer, full in zip(run.layers, tiny.run.layers, strict=True):
        assert torch.equal(layer.values, full.values)
        assert torch.equal(layer.resid_post, full.resid_post)


def test_model_run_is_frozen(tiny: Tiny) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.run.logits = torch.zeros(1)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.run.layers[0].resid_pre = torch.zeros(1)  # type: ignore[misc]
    assert isinstance(tiny.run.layers, tuple)
    assert isinstance(tiny.run.token_ids, tuple)
    assert isinstance(tiny.run.tokens, tuple)


def test_runs_do_not_share_or_mutate_each_other(tiny: Tiny) -> None:
    first = tiny.llm.run(PROMPT)
    snapshot = [first.logits.clone()] + [
        t.clone() for layer in first.layers for t in (layer.resid_pre, layer.resid_post)
    ]
    second = tiny.llm.run(prompt(5, seed=1))
    after = [first.logits] + [
        t for layer in first.layers for t in (layer.resid_pre, layer.resid_post)
    ]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after, strict=True))
    assert second.token_ids != first.token_ids
    assert second.logits.shape[0] == len(second.token_ids) == 6
    assert first.logits.data_ptr() != second.logits.data_ptr()
    assert first.layers[0].resid_post.data_ptr() != second.layers[0].resid_post.data_ptr()
    # The same prompt again gives the same result.
    assert torch.equal(tiny.llm.run(PROMPT).logits, first.logits)


# -- tokenize --------------------------------------------------------------------------------------


def test_tokens_are_what_the_model_consumed(tiny: Tiny) -> None:
    words = PROMPT.split()
    assert tiny.run.token_ids == (BOS, *(WORDS.index(w) + 3 for w in words))
    assert list(tiny.run.token_ids) == tiny.llm.tokenize(PROMPT)
    assert tiny.run.tokens == ("<bos>", *words)
    assert tiny.run.logits.shape[0] == len(tiny.run.token_ids)


def test_prepend_bos_false_strips_the_bos() -> None:
    llm = BridgeLlm("t", tiny_hf_model("llama-gqa"), tiny_tokenizer(), prepend_bos=False)
    assert llm.tokenize("w0 w1") == [3, 4]
    assert llm.info.prepends_bos is False
    run = llm.run("w0 w1")
    assert run.token_ids == (3, 4)
    assert run.logits.shape[0] == 2
    ref = tiny_hf_model("llama-gqa")
    with torch.no_grad():
        expected = ref(torch.tensor([[3, 4]])).logits[0]
    assert rel_err(run.logits, expected) <= RTOL


def test_prepend_bos_true_adds_a_bos_once(tmp_path: Path) -> None:
    tok = no_bos_tokenizer(tmp_path)
    follow = BridgeLlm("t", tiny_hf_model("llama-gqa"), tok)
    assert follow.tokenize("w0 w1") == [3, 4]
    assert follow.info.prepends_bos is False
    forced = BridgeLlm("t", tiny_hf_model("llama-gqa"), tok, prepend_bos=True)
    assert forced.tokenize("w0 w1") == [BOS, 3, 4]
    assert forced.info.prepends_bos is True
    assert forced.run("w0 w1").token_ids == (BOS, 3, 4)
    # A tokenizer that already adds a BOS does not get a second one.
    already = BridgeLlm("t", tiny_hf_model("llama-gqa"), tiny_tokenizer(), prepend_bos=True)
    assert already.tokenize("w0 w1") == [BOS, 3, 4]


@pytest.mark.parametrize("text", ["", " ", "  \n\t "])
def test_empty_prompt_is_a_prompt_error(tiny: Tiny, text: str) -> None:
    with pytest.raises(PromptError, match="empty"):
        tiny.llm.tokenize(text)
    with pytest.raises(PromptError):
        tiny.llm.run(text)


def test_prompt_over_the_context_is_a_prompt_error() -> None:
    llm = BridgeLlm("t", tiny_hf_model("llama-gqa"), tiny_tokenizer(), max_tokens=6)
    assert len(llm.run(prompt(5)).token_ids) == 6  # exactly at the limit: fine
    with pytest.raises(PromptError, match="7 tokens"):
        llm.tokenize(prompt(6))
    with pytest.raises(PromptError):
        llm.run(prompt(6))


# -- what analyses ask of the model interface --------------------------------------------------


def test_hook_names_read_what_each_site_holds(tiny: Tiny) -> None:
    """Each HookSite's hook sees the activation the run captured under its own name (z: the
    mixed values Σ_s A·v, pattern, neuron activations, FFN update, router weights), in every
    layer."""
    llm, run = tiny.llm, tiny.run
    seen: dict[str, Tensor] = {}

    def grab(name: str) -> Any:
        def hook(tensor: Tensor, hook: Any) -> None:
            seen[name] = tensor[0].detach().clone()

        return hook

    moe = set(llm.info.moe_layers)
    names = {
        (s, layer): llm.hook_name(s, layer)
        for layer in range(run.n_layers)
        for s in ("z", "pattern", "ffn", "experts" if layer in moe else "neurons")
    }
    assert len(set(names.values())) == len(names)
    llm.logits_with_hooks(run.token_ids, [(n, grab(n)) for n in names.values()])
    for layer, captured in enumerate(run.layers):
        assert captured.pattern is not None
        assert torch.equal(seen[names["pattern", layer]], captured.pattern)
        assert torch.equal(seen[names["ffn", layer]], captured.mlp_update)
        if captured.experts is None:
            assert torch.equal(seen[names["neurons", layer]], captured.neuron_acts)
            with pytest.raises(ValueError, match="dense FFN"):
                llm.hook_name("experts", layer)
        else:  # the router weights, dense over the experts: zero where none was chosen
            ex = captured.experts
            weights = seen[names["experts", layer]]  # [T, E]
            assert torch.equal(weights.gather(-1, ex.index.long()), ex.weight)
            assert int((weights != 0).sum()) == ex.index.numel()
            with pytest.raises(ValueError, match="no dense neurons"):
                llm.hook_name("neurons", layer)
        z = seen[names["z", layer]]  # [T, H, d_head]
        mixed = torch.einsum("hts,shk->thk", captured.pattern, captured.values)
        # float32 sums over T = 10 sources of |A·v| ≤ max|v|
        torch.testing.assert_close(
            z, mixed, rtol=0, atol=f32_tol(float(captured.values.abs().max()), terms=run.n_tokens)
        )


def test_hook_name_refuses_layers_the_model_lacks(tiny: Tiny) -> None:
    llm, run = tiny.llm, tiny.run
    with pytest.raises(ValueError, match=f"0..{run.n_layers - 1}"):
        llm.hook_name("z", run.n_layers)


def test_encode_and_decode_skip_special_tokens(tiny: Tiny) -> None:
    llm = tiny.llm
    ids = llm.encode("w3 w7")
    assert len(ids) == 2 and llm.tokenize("w3 w7")[-2:] == ids  # tokenize adds the BOS
    assert llm.decode(ids) == "w3 w7"
