"""An attention edge split over its source's SAE latents (llm_flow/analyses/edge_latents.py):
each part equals a float64 reference computed from the HF model's own weights and attention
weights (RMSNorm with GQA, LayerNorm with biases, a post-norm model), the parts sum to the
edge's part on every tiny family, and the contributions sum to 1."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import Tensor

from llm_flow.analyses.edge_latents import edge_latents, edge_parts
from llm_flow.analyses.latents import decompose
from llm_flow.analyses.lens import residual_vector
from llm_flow.engine.trace import Trace, trace
from llm_flow.errors import SaeError
from llm_flow.models import wrap_hf
from llm_flow.models.bridge import BridgeLlm
from llm_flow.models.sae import Sae
from tests.families import FAMILIES
from tests.tiny import prompt, random_model, tiny_hf_model, tiny_tokenizer
from tests.unit.analyses.test_latents import D_SAE, random_sae

EDGE, LAYER, TARGET, SOURCE = "I0_2->A1_4", 1, 4, 2
HOOK = "blocks.0.hook_resid_post"


@functools.cache
def _tiny(arch: str) -> tuple[Trace, torch.nn.Module]:
    hf = tiny_hf_model(arch)
    reference = copy.deepcopy(hf).double()
    llm = BridgeLlm(arch, hf, tiny_tokenizer(), dtype=torch.float32)
    return trace(llm, prompt(6)), reference


def _reference_run(model: Any, token_ids: tuple[int, ...], layer: Any) -> dict[str, Tensor]:
    """Layer ``layer``'s input, attention weights [H, T, T] and attention output [T, D] from
    the float64 HF model with eager attention."""
    model.set_attn_implementation("eager")
    got: dict[str, Tensor] = {}
    attn = layer.self_attn if hasattr(layer, "self_attn") else layer.attn

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["x"] = (args[0] if args else kwargs["hidden_states"])[0]

    def post(module: Any, args: Any, output: tuple[Tensor, Tensor]) -> None:
        got["out"], got["pattern"] = output[0][0], output[1][0]

    handles = [
        layer.register_forward_pre_hook(pre, with_kwargs=True),
        attn.register_forward_hook(post),
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([token_ids]))
    finally:
        for handle in handles:
            handle.remove()
    return got


def _rms(x: Tensor, eps: float) -> Tensor:
    return (x.pow(2).mean() + eps).sqrt()


def _reference_parts(arch: str, pieces: Tensor, token_ids: tuple[int, ...]) -> Tensor:
    """Each piece of the source's residual [N, D] (and zeros, for the constant) pushed through
    layer LAYER's pre-attention norm at the source's frozen scale, the value and output
    projections and the attention weights A[h, TARGET, SOURCE], from the weights → [N + 1, D]."""
    model = _tiny(arch)[1]
    pieces = torch.cat([pieces, torch.zeros_like(pieces[:1])])
    with_constant = torch.zeros(len(pieces), 1, dtype=torch.float64)
    with_constant[-1] = 1  # only the zeros' row gets the map's constant
    if arch == "gpt2-bias":
        block = model.transformer.h[LAYER]
        got = _reference_run(model, token_ids, block)
        x = got["x"][SOURCE]
        ln = block.ln_1
        sigma = (x.var(unbiased=False) + ln.eps).sqrt()
        h = (pieces - pieces.mean(-1, keepdim=True)) / sigma * ln.weight + with_constant * ln.bias
        d = model.config.n_embd
        v = (
            h @ block.attn.c_attn.weight[:, 2 * d :]
            + with_constant * block.attn.c_attn.bias[2 * d :]
        )
        W_O = block.attn.c_proj.weight  # Conv1D: [H · d_head, D]
        n_heads = model.config.n_head
    else:
        block = model.model.layers[LAYER]
        got = _reference_run(model, token_ids, block)
        x = got["x"][SOURCE]
        norm = block.input_layernorm
        eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
        gain = norm.weight if arch == "llama-gqa" else 1 + norm.weight  # Gemma's (1 + w)
        v = (pieces / _rms(x, eps) * gain) @ block.self_attn.v_proj.weight.T
        W_O = block.self_attn.o_proj.weight.T  # [H · d_head, D]
        n_heads = model.config.num_attention_heads
    d_head = W_O.shape[0] // n_heads
    v = v.unflatten(-1, (-1, d_head))  # [N, H_kv, d_head]
    v = v.repeat_interleave(n_heads // v.shape[1], dim=1)  # each query head's K/V head
    A = got["pattern"][:, TARGET, SOURCE]  # [H]
    parts = torch.einsum("h,nhk,hkd->nd", A, v, W_O.unflatten(0, (n_heads, d_head)))
    if arch == "gemma3-postnorm":  # the post-attention norm at the target's frozen scale
        post = block.post_attention_layernorm
        parts = parts / _rms(got["out"][TARGET], post.eps) * (1 + post.weight)
    return parts


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2-bias", "gemma3-postnorm"])
def test_parts_equal_a_float64_reference_from_the_weights(arch: str) -> None:
    tr = _tiny(arch)[0]
    sae = random_sae(HOOK)
    split = edge_parts(tr, EDGE, sae)
    x = residual_vector(tr.run, "I0_2")
    active, _, pieces = decompose(sae, x)  # latents, b_dec, ε
    assert torch.equal(split.active, active) and len(active) > 3
    with torch.no_grad():
        expected = _reference_parts(arch, pieces, tr.token_ids)  # latents, b_dec, ε, constant
    n = len(active)
    expected = expected[[*range(n + 1), n + 2, n + 1]]  # latents, b_dec, bias, ε
    # The model's float32 attention maps each piece: its rounding is ~1e-7 of the largest part.
    size = float(expected.abs().max())
    torch.testing.assert_close(split.parts, expected, rtol=0, atol=1e-5 * size)
    torch.testing.assert_close(split.parts.sum(0), split.whole, rtol=0, atol=1e-5 * size)
    has_bias = arch == "gpt2-bias"  # LayerNorm and value biases; the RMSNorm models have none
    assert (float(split.parts[n + 1].abs().max()) > 1e-3 * size) == has_bias


@functools.cache
def _family_trace(name: str) -> Trace:
    hf = random_model(FAMILIES[name].config())
    llm = wrap_hf(name, hf, tiny_tokenizer(), device="cpu", dtype=torch.float32)
    return trace(llm, prompt(6))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_splits_its_edges(name: str) -> None:
    tr = _family_trace(name)
    d_model = tr.llm.info.d_model
    for edge, hook in ((EDGE, HOOK), ("X0_3->A0_5", "blocks.0.hook_resid_pre")):
        sae = random_sae(hook, d_in=d_model, seed=1)
        split = edge_parts(tr, edge, sae)  # raises SelfCheckError unless Σ parts = the part
        size = float(split.parts.abs().sum(0).max())
        assert float((split.parts.sum(0) - split.whole).abs().max()) <= 1e-4 * size
        assert float(split.whole.abs().max()) > 0
        result = edge_latents(tr, edge, sae, top=D_SAE)
        total = (
            result.latents_contribution
            + result.b_dec_contribution
            + result.bias_contribution
            + result.error_contribution
        )
        assert total == pytest.approx(1, abs=1e-9)
        assert result.l0 == len(result.latents) == len(split.active)


def test_json_and_top() -> None:
    tr = _tiny("gpt2-bias")[0]
    result = edge_latents(tr, EDGE, random_sae("blocks.1.hook_resid_pre"), top=3)  # reads I0
    data = result.to_json()
    assert data["edge"] == EDGE and data["source"] == "I0_2" and data["target"] == "A1_4"
    assert data["hook"] == "blocks.1.hook_resid_pre" and len(data["latents"]) == 3
    assert set(data["latents"][0]) == {"index", "activation", "contribution"}
    contributions = [latent["contribution"] for latent in data["latents"]]
    assert contributions == sorted(contributions, reverse=True)
    assert data["weight"] == pytest.approx(float(tr.graph.attention_at(LAYER, TARGET, SOURCE)))
    assert data["part_norm"] > 0


@pytest.mark.parametrize(
    ("edge", "hook", "message"),
    [
        ("I0_2", HOOK, "not an attention edge"),
        ("I0_2->I1_4", HOOK, "not an attention edge"),
        ("I1_2->A1_4", HOOK, "not an attention edge"),  # the source of A1 is I0
        ("I0_5->A1_4", HOOK, "not an attention edge"),  # a later source
        ("I5_2->A6_4", HOOK, "outside this run"),
        ("I0_2->A1_4", "blocks.1.hook_resid_post", "reads 'blocks.1.hook_resid_post'"),
    ],
)
def test_errors_say_what_is_wrong(edge: str, hook: str, message: str) -> None:
    tr = _tiny("llama-gqa")[0]
    with pytest.raises(SaeError, match=message):
        edge_latents(tr, edge, random_sae(hook))
    wide: Sae = random_sae(HOOK, d_in=16)
    with pytest.raises(SaeError, match="16-dimensional"):
        edge_latents(tr, EDGE, wide)
