"""QK attribution against a slow float64 reference written from the definition with the HF
model's own weights: every query-side, key-side and paired term, not only their sum.

Llama (RMSNorm, rotary, grouped-query heads), GPT-2 (LayerNorm with a bias, learned positions,
q/k biases) and DeepSeek V2/V3 (latent attention: RMSNorms inside the query and key paths, a
rotary part shared by all heads), all with randomized norms and biases. The reference takes the
residual parts from :func:`residual_parts` (checked here to sum to HF's own hidden state) and
nothing else from llm-flow: no hook, no captured scale, no TransformerBridge.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from llm_flow.analyses.attend import attend, residual_parts
from llm_flow.engine.trace import trace
from llm_flow.models import wrap_hf
from tests.families import FAMILIES
from tests.tiny import random_model, tiny_tokenizer

PROMPT = " ".join(f"w{i}" for i in (5, 17, 3, 42, 8, 23, 11, 30, 2))  # 10 tokens with BOS
LAYER, HEAD, QUERY, SOURCE = 1, 3, 9, 4
f64 = torch.float64
# (queries, keys) of parts [N, T, D] → ([N, T, H, d], [N, T, H_kv, d]); ``bias`` adds the
# norm's and the projections' biases (the image of the zero vector).
QkMap = Callable[[Tensor, bool], tuple[Tensor, Tensor]]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _llama(hf: torch.nn.Module, resid: Tensor) -> tuple[QkMap, float]:
    block = hf.model.layers[LAYER]
    attn = block.self_attn
    norm = block.input_layernorm
    rms = (resid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()  # [T, 1]
    d = attn.head_dim
    positions = torch.arange(resid.shape[0])[None]
    cos, sin = (c[0].to(f64) for c in hf.model.rotary_emb(resid[None].float(), positions))

    def qk(parts: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
        h = norm.weight.to(f64) * parts / rms  # RMSNorm at the model's scale; no norm bias
        q = (h @ attn.q_proj.weight.to(f64).T).unflatten(-1, (-1, d))  # [N, T, H, d]
        k = (h @ attn.k_proj.weight.to(f64).T).unflatten(-1, (-1, d))
        rot = cos[:, None], sin[:, None]  # [T, 1, d]
        return q * rot[0] + _rotate_half(q) * rot[1], k * rot[0] + _rotate_half(k) * rot[1]

    return qk, d**-0.5


def _gpt2(hf: torch.nn.Module, resid: Tensor) -> tuple[QkMap, float]:
    block = hf.transformer.h[LAYER]
    norm, c_attn = block.ln_1, block.attn.c_attn
    sigma = (resid.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # [T, 1]
    width = resid.shape[-1]
    d = width // hf.config.n_head

    def qk(parts: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
        h = norm.weight.to(f64) * (parts - parts.mean(-1, keepdim=True)) / sigma
        if bias:
            h = h + norm.bias.to(f64)
        out = h @ c_attn.weight.to(f64) + (c_attn.bias.to(f64) if bias else 0)  # Conv1D
        q, k = out[..., :width], out[..., width : 2 * width]
        return q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d))

    return qk, d**-0.5


def _rms(x: Tensor, eps: float) -> Tensor:
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _linear(layer: torch.nn.Module, x: Tensor, bias: bool) -> Tensor:
    out = x @ layer.weight.to(f64).T
    return out + layer.bias.to(f64) if bias and layer.bias is not None else out


def _deepseek(hf: torch.nn.Module, resid: Tensor) -> tuple[QkMap, float]:
    block = hf.model.layers[LAYER]
    attn, norm = block.self_attn, block.input_layernorm
    h_real = norm.weight.to(f64) * resid / _rms(resid, norm.variance_epsilon)
    latent = attn.kv_lora_rank
    kv_real = _linear(attn.kv_a_proj_with_mqa, h_real, True)[..., :latent]
    scales = {"kv": _rms(kv_real, attn.kv_a_layernorm.variance_epsilon)}  # [T, 1] each
    if attn.q_lora_rank is not None:
        q_real = _linear(attn.q_a_proj, h_real, True)
        scales["q"] = _rms(q_real, attn.q_a_layernorm.variance_epsilon)
    positions = torch.arange(resid.shape[0])[None]
    table = hf.model.rotary_emb(resid[None].float(), positions)
    if isinstance(table, Tensor):  # V2: complex exp(i·angle) per pair
        cos, sin = table[0].real.to(f64), table[0].imag.to(f64)
    else:  # V3: cos and sin of cat(angles, angles)
        cos, sin = (c[0, :, : c.shape[-1] // 2].to(f64) for c in table)
    cos, sin = cos[:, None], sin[:, None]  # [T, 1, rope / 2]
    rope, nope = attn.qk_rope_head_dim, attn.qk_nope_head_dim

    def rotate(x: Tensor) -> Tensor:  # DeepSeek pairs dimensions (2i, 2i + 1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)

    def qk(parts: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
        h = norm.weight.to(f64) * parts / _rms(resid, norm.variance_epsilon)
        if attn.q_lora_rank is None:
            q = _linear(attn.q_proj, h, bias)
        else:
            a = attn.q_a_layernorm.weight.to(f64) * _linear(attn.q_a_proj, h, bias) / scales["q"]
            q = _linear(attn.q_b_proj, a, bias)
        q = q.unflatten(-1, (-1, nope + rope))  # [N, T, H, nope + rope]
        kv = _linear(attn.kv_a_proj_with_mqa, h, bias)
        c = attn.kv_a_layernorm.weight.to(f64) * kv[..., :latent] / scales["kv"]
        k_nope = _linear(attn.kv_b_proj, c, bias).unflatten(-1, (q.shape[2], -1))[..., :nope]
        k_rope = rotate(kv[..., None, latent:]).expand(-1, -1, q.shape[2], -1)
        q = torch.cat([q[..., :nope], rotate(q[..., nope:])], dim=-1)
        return q, torch.cat([k_nope, k_rope], dim=-1)

    return qk, attn.scaling


@pytest.mark.parametrize(
    ("family", "build"),
    [("Llama 3", _llama), ("GPT-2", _gpt2), ("DeepSeek-V2", _deepseek), ("DeepSeek-V3", _deepseek)],
)
def test_every_term_matches_the_float64_reference(
    family: str, build: Callable[[torch.nn.Module, Tensor], tuple[QkMap, float]]
) -> None:
    hf = random_model(FAMILIES[family].config())
    tr = trace(wrap_hf(family, hf, tiny_tokenizer(), device="cpu", dtype=torch.float32), PROMPT)
    with torch.no_grad():
        hidden = hf(torch.tensor([tr.token_ids]), output_hidden_states=True).hidden_states
        resid = hidden[LAYER][0].to(f64)  # [T, D]
        blocks = list(residual_parts(tr.run, LAYER, tr.n_tokens))
        parts_meta = [part for names, _ in blocks for part in names]
        parts = torch.cat([block for _, block in blocks]).to(f64)
        torch.testing.assert_close(parts.sum(0), resid, rtol=0, atol=1e-4)
        qk, scale = build(hf, resid)
        q, k = qk(parts, False)  # [N, T, H, d], [N, T, H_kv, d]
        q0, k0 = qk(torch.zeros_like(parts[:1]), True)
        q[-1], k[-1] = q[-1] + q0[0], k[-1] + k0[0]  # the last part is "bias"
    g = HEAD // (q.shape[2] // k.shape[2])
    q_t, k_s = q[:, QUERY, HEAD], k[:, SOURCE, g]  # [N, d]
    pairs = q_t @ k_s.T * scale  # [N, N]
    result = attend(tr, LAYER, HEAD, QUERY, SOURCE, top=None)
    names_q = [p.name(QUERY) for p in parts_meta]
    names_k = [p.name(SOURCE) for p in parts_meta]
    size = float(pairs.abs().max())
    tol = 1e-5 * size
    ours_q = {t.component: t.value for t in result.direct.query_terms}
    ours_k = {t.component: t.value for t in result.direct.key_terms}
    assert ours_q.keys() == set(names_q) and ours_k.keys() == set(names_k)
    for name, value in zip(names_q, pairs.sum(1).tolist(), strict=True):
        assert ours_q[name] == pytest.approx(value, abs=tol), name
    for name, value in zip(names_k, pairs.sum(0).tolist(), strict=True):
        assert ours_k[name] == pytest.approx(value, abs=tol), name
    ours_pairs = {(p.query_component, p.key_component): p.value for p in result.direct.pairs}
    assert len(ours_pairs) == len(names_q) ** 2
    for (i, qn), (j, kn) in itertools.product(enumerate(names_q), enumerate(names_k)):
        assert ours_pairs[qn, kn] == pytest.approx(float(pairs[i, j]), abs=tol), (qn, kn)
    assert result.direct.terms_sum == pytest.approx(float(pairs.sum()), abs=tol)
    # Not vacuous: the largest terms are far above the tolerance.
    assert max(abs(v) for v in ours_q.values()) > 1e4 * tol
