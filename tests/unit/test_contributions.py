"""Contribution math: hand-computed cases, invariants, and agreement with a slow loop version."""

from __future__ import annotations

import pytest
import torch

from llm_flow.engine.contributions import (
    attention_proximity,
    causal_tiles,
    head_contributions,
    layer_contributions,
    neuron_contributions,
    normalize,
    proximity,
)
from llm_flow.engine.graph import contributions_of, layer_head_contributions
from llm_flow.models.base import LayerRun
from tests.tiny import ARCHS, prompt, tiny_llm


def _layer_kwargs(layer: LayerRun) -> dict[str, torch.Tensor | None]:
    return {
        "resid_pre": layer.resid_pre,
        "resid_mid": layer.resid_mid,
        "resid_post": layer.resid_post,
        "mlp_update": layer.mlp_update,
        "pattern": layer.pattern,
        "head_outputs": layer.head_outputs(),
        "attn_scale": layer.attn_scale,
        "attn_bias": layer.b_O,
    }


def slow_attention_contributions(layer: LayerRun) -> torch.Tensor:
    """Row t: [c(s=0..T-1), c(residual), c(bias), c(ffn, parallel only)] by explicit loops."""
    assert layer.pattern is not None
    n = layer.resid_pre.shape[0]
    parallel = layer.resid_mid is None
    whole = (layer.resid_post if parallel else layer.resid_mid).double()
    u = layer.head_outputs(torch.float64)  # [S, H, D]
    out = torch.zeros(n, n + 3, dtype=torch.float64)
    for t in range(n):
        scale = float(layer.attn_scale[t])
        parts = []
        for s in range(n):
            z = torch.zeros_like(whole[t])
            for h in range(u.shape[1]):
                z = z + float(layer.pattern[h, t, s]) * u[s, h]
            parts.append(z * scale)
        parts.append(layer.resid_pre[t].double())
        parts.append(layer.b_O.double() * scale)
        parts.append(layer.mlp_update[t].double() if parallel else torch.zeros_like(whole[t]))
        y = whole[t]
        prox = [max(float(y.abs().sum() - (y - z).abs().sum()), 0.0) for z in parts]
        total = sum(prox)
        out[t] = torch.tensor([p / total for p in prox], dtype=torch.float64)
    return out


@pytest.fixture(scope="module", params=ARCHS)
def tiny_run(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    llm = tiny_llm(request.param)
    return llm.run(prompt(11, seed=3))


# -- hand-computed cases (published LLM-TT unit cases) ------------------------------------------


def test_llm_tt_case_per_head_parts() -> None:
    whole = torch.tensor([2.0, 2.0])
    parts = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [2.0, 1.0]])  # head 1, head 2, residual
    c = normalize(proximity(whole, parts))
    torch.testing.assert_close(c, torch.tensor([0.4, 0.0, 0.6]))


def test_llm_tt_case_through_the_engine() -> None:
    """The same case as one query token, two heads, through the real chunked functions."""
    kwargs = {
        "resid_pre": torch.tensor([[2.0, 1.0]]),
        "resid_mid": torch.tensor([[2.0, 2.0]]),
        "resid_post": torch.tensor([[2.0, 2.0]]),
        "mlp_update": torch.zeros(1, 2),
        "pattern": torch.ones(2, 1, 1),
        "head_outputs": torch.tensor([[[1.0, 1.0], [-1.0, 0.0]]]),  # [S=1, H=2, D=2]
        "attn_scale": torch.ones(1),
        "attn_bias": torch.zeros(2),
    }
    heads, residual = head_contributions(**kwargs, rows=torch.tensor([0]))
    torch.testing.assert_close(heads[0, 0], torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(residual, torch.tensor([0.6]))
    # Heads summed into one token-level part [0, 1]: prox 1 vs residual 3.
    c = layer_contributions(**kwargs)
    torch.testing.assert_close(c.attention, torch.tensor([[0.25]]))
    torch.testing.assert_close(c.attn_residual, torch.tensor([0.75]))
    assert float(c.attn_bias) == 0.0


def test_negative_proximity_is_clamped_and_zero_part_scores_zero() -> None:
    whole = torch.tensor([1.0, -1.0])
    parts = torch.tensor([[-3.0, 3.0], [0.0, 0.0], [1.0, -1.0]])
    prox = proximity(whole, parts)
    assert prox.tolist() == [0.0, 0.0, 2.0]


def test_normalize_of_all_zero_parts_is_zero_not_nan() -> None:
    assert normalize(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_elementwise_form_survives_huge_residual_norms() -> None:
    """A residual with one massive dimension (L1 ~ 67,000 as in SmolLM2): fp32 must still agree
    with fp64, where subtracting two fp32 L1 sums would not."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(576, generator=gen, dtype=torch.float64)
    whole[7] = 60_000.0
    part = torch.randn(576, generator=gen, dtype=torch.float64) * 0.05
    exact = float(proximity(whole, part[None]))
    ours = float(proximity(whole.float(), part.float()[None]))
    two_sums = float(whole.float().abs().sum() - (whole.float() - part.float()).abs().sum())
    assert abs(ours - exact) < 1e-4 * exact
    assert abs(two_sums - exact) > 10 * abs(ours - exact)


def test_neuron_contributions_keep_the_sign_and_sum_to_one() -> None:
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(6, 8, generator=gen)
    acts = torch.tensor([2.0, -1.5, 0.0, 0.3, -0.2, 1.0])
    base = torch.randn(8, generator=gen) * 3
    b_out = torch.randn(8, generator=gen) * 0.1
    scale = torch.tensor(0.7)
    whole = base + (acts @ w_out + b_out) * scale
    neurons, bias, residual = neuron_contributions(whole, base, acts, w_out, b_out, scale)
    torch.testing.assert_close(neurons.sum() + bias + residual, torch.tensor(1.0))
    assert neurons[2] == 0  # a silent neuron writes nothing
    # Neuron 1's part is -1.5·W_out[1]·scale, not +1.5·W_out[1]: recompute both.
    signed = proximity(whole, (acts[1] * w_out[1] * scale)[None])
    flipped = proximity(whole, (-acts[1] * w_out[1] * scale)[None])
    assert not torch.allclose(signed, flipped)
    parts = torch.cat([acts[:, None] * w_out * scale, (b_out * scale)[None], base[None]])
    torch.testing.assert_close(neurons, normalize(proximity(whole, parts))[:-2])


# -- invariants on real (tiny) models ---------------------------------------------------------


def test_engine_matches_slow_loop(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        c = contributions_of(layer)
        slow = slow_attention_contributions(layer)
        n = c.attention.shape[0]
        torch.testing.assert_close(c.attention.double(), slow[:, :n], atol=1e-6, rtol=0)
        torch.testing.assert_close(c.attn_residual.double(), slow[:, n], atol=1e-6, rtol=0)
        torch.testing.assert_close(c.attn_bias.double(), slow[:, n + 1], atol=1e-6, rtol=0)
        if layer.resid_mid is None:
            torch.testing.assert_close(c.ffn.double(), slow[:, n + 2], atol=1e-6, rtol=0)


def test_contributions_are_nonnegative_causal_and_sum_to_one(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        c = contributions_of(layer)
        assert (c.attention >= 0).all() and (c.attn_residual >= 0).all()
        assert (c.ffn >= 0).all() and (c.ffn_residual >= 0).all()
        assert (c.attention.triu(1) == 0).all(), "no contribution from future tokens"
        attn_total = c.attention.sum(1) + c.attn_residual + c.attn_bias
        if layer.resid_mid is None:
            attn_total = attn_total + c.ffn
        torch.testing.assert_close(attn_total, torch.ones_like(attn_total))
        torch.testing.assert_close(c.ffn + c.ffn_residual, torch.ones_like(c.ffn))


def test_chunked_equals_unchunked(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        kwargs = _layer_kwargs(layer)
        one_row = layer_contributions(**kwargs, memory_budget=1, backend="torch")  # type: ignore[arg-type]
        everything = layer_contributions(**kwargs, memory_budget=2**34, backend="torch")  # type: ignore[arg-type]
        torch.testing.assert_close(one_row.attention, everything.attention, atol=1e-7, rtol=0)
        heads_small, _ = layer_head_contributions(layer, torch.arange(4), memory_budget=1)
        heads_big, _ = layer_head_contributions(layer, torch.arange(4), memory_budget=2**34)
        torch.testing.assert_close(heads_small, heads_big, atol=1e-7, rtol=0)


def test_fused_cpu_kernel_equals_the_torch_version(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        kwargs = _layer_kwargs(layer)
        kernel = layer_contributions(**kwargs, backend="kernel")  # type: ignore[arg-type]
        reference = layer_contributions(**kwargs, backend="torch")  # type: ignore[arg-type]
        torch.testing.assert_close(kernel.attention, reference.attention, atol=1e-6, rtol=0)
        torch.testing.assert_close(kernel.attn_residual, reference.attn_residual, atol=1e-6, rtol=0)


def test_fused_kernel_handles_massive_dimensions_and_long_prompts() -> None:
    gen = torch.Generator().manual_seed(2)
    n, h, d = 300, 3, 40
    causal = torch.full((n, n), float("-inf")).triu(1)
    pattern = torch.softmax(torch.randn(h, n, n, generator=gen) + causal, -1)
    whole = torch.randn(n, d, generator=gen)
    whole[:, 5] = 3_000.0
    u = torch.randn(n, h, d, generator=gen)
    scale = torch.rand(n, generator=gen) + 0.5
    kernel = attention_proximity(whole, pattern, u, scale, backend="kernel")
    exact = attention_proximity(
        whole.double(), pattern.double(), u.double(), scale.double(), backend="torch"
    )
    torch.testing.assert_close(kernel.double(), exact, atol=2e-5, rtol=1e-5)
    assert (kernel.triu(1) == 0).all()


def test_float32_agrees_with_float64(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        kwargs = _layer_kwargs(layer)
        as64 = {k: (v.double() if v is not None else None) for k, v in kwargs.items()}
        c32 = layer_contributions(**kwargs)  # type: ignore[arg-type]
        c64 = layer_contributions(**as64)  # type: ignore[arg-type]
        torch.testing.assert_close(c32.attention, c64.attention, atol=1e-6, rtol=0)
        torch.testing.assert_close(c32.ffn, c64.ffn, atol=1e-6, rtol=0)


def test_head_contributions_match_a_loop_and_normalize_with_residual(tiny_run) -> None:  # type: ignore[no-untyped-def]
    layer = tiny_run.layers[-1]
    assert layer.pattern is not None
    rows = torch.tensor([0, 5, layer.resid_pre.shape[0] - 1])
    heads, residual = layer_head_contributions(layer, rows)
    whole_all = layer.resid_post if layer.resid_mid is None else layer.resid_mid
    u = layer.head_outputs(torch.float64)
    for i, t in enumerate(rows.tolist()):
        whole = whole_all[t].double()
        scale = layer.attn_scale[t].double()
        parts = [
            layer.pattern[h, t, s].double() * scale * u[s, h]
            for s in range(u.shape[0])
            for h in range(u.shape[1])
        ]
        parts += [layer.resid_pre[t].double(), layer.b_O.double() * scale]
        if layer.resid_mid is None:
            parts.append(layer.mlp_update[t].double())
        expected = normalize(proximity(whole, torch.stack(parts)))
        n_h = u.shape[1]
        torch.testing.assert_close(
            heads[i].double().flatten(), expected[: u.shape[0] * n_h], atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            residual[i].double(), expected[u.shape[0] * n_h], atol=1e-6, rtol=0
        )
        assert (heads[i, t + 1 :] == 0).all()


def test_post_norm_scale_changes_the_parts() -> None:
    """Gemma-style 1/rms folding must be used: ignoring it gives parts that don't sum up."""
    llm = tiny_llm("gemma3-postnorm")
    layer = llm.run(prompt(6)).layers[0]
    assert not torch.allclose(layer.attn_scale, torch.ones_like(layer.attn_scale))
    assert layer.pattern is not None
    kwargs = _layer_kwargs(layer) | {"attn_scale": torch.ones_like(layer.attn_scale)}
    wrong = layer_contributions(**kwargs)  # type: ignore[arg-type]
    right = contributions_of(layer)
    assert not torch.allclose(wrong.attention, right.attention, atol=1e-3)


@pytest.mark.parametrize(("n", "budget"), [(1, 10), (7, 1), (100, 3 * 576 * 4), (300, 2**20)])
def test_causal_tiles_cover_each_causal_pair_once_within_budget(n: int, budget: int) -> None:
    seen = torch.zeros(n, n, dtype=torch.int64)
    for q0, q1, s0, s1 in causal_tiles(n, n, 576 * 4, budget):
        assert (q1 - q0) * (s1 - s0) * 576 * 4 <= budget or (q1 - q0) * (s1 - s0) == 1
        seen[q0:q1, s0:s1] += 1
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert (seen[causal] == 1).all()
    assert (seen.triu(1) <= 1).all()  # a tile may overlap the diagonal, never repeat a pair


def test_attention_proximity_memory_is_bounded() -> None:
    """With a small budget no temporary is larger than the budget: track the allocator peak."""
    gen = torch.Generator().manual_seed(0)
    n, h, d = 64, 3, 32
    pattern = torch.rand(h, n, n, generator=gen).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    whole = torch.randn(n, d, generator=gen)
    u = torch.randn(n, h, d, generator=gen)
    ones = torch.ones(n)
    full = attention_proximity(whole, pattern, u, ones, memory_budget=2**30, backend="torch")
    small = attention_proximity(whole, pattern, u, ones, memory_budget=n * d * 8, backend="torch")
    torch.testing.assert_close(full, small)
