"""Contribution math: hand-computed cases, invariants, and agreement with a slow loop version."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from llm_flow.engine import contributions
from llm_flow.engine.contributions import (
    attention_proximity,
    causal_tiles,
    head_contributions,
    head_proximity,
    kernel_for,
    layer_contributions,
    neuron_contributions,
    normalize,
    proximity,
)
from llm_flow.engine.graph import contributions_of, layer_head_contributions
from tests.conftest import f32_tol
from tests.reference import layer_kwargs, layer_kwargs64, slow_attention_contributions
from tests.tiny import ARCHS, prompt, tiny_llm


def _parts_l1(
    pattern: torch.Tensor, head_outputs: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Σ_h |scale[t]·A[h, t, s]|·‖u[s, h]‖₁ → [T, S] (float64): the size of the terms that
    prox[t, s] is computed from, so its rounding error is a multiple of eps times this."""
    u_l1 = head_outputs.double().abs().sum(-1)  # [S, H]
    return torch.einsum("hts,sh->ts", pattern.double().abs(), u_l1) * scale.double().abs()[:, None]


@pytest.fixture(scope="module", params=ARCHS)
def tiny_run(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    llm = tiny_llm(request.param)
    return llm.run(prompt(11, seed=3))


# -- hand-computed cases (published LLM-TT unit cases) ------------------------------------------


def test_llm_tt_case_per_head_parts() -> None:
    whole = torch.tensor([2.0, 2.0])
    parts = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [2.0, 1.0]])  # head 1, head 2, residual
    c = normalize(proximity(whole, parts))
    # Exact: small-integer proximities (2, 0, 3) and one correctly rounded division per share.
    torch.testing.assert_close(c, torch.tensor([0.4, 0.0, 0.6]), rtol=0, atol=0)


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
    # Exact, as above: integer proximities, one rounded division per share.
    heads, residual = head_contributions(**kwargs, rows=torch.tensor([0]))
    torch.testing.assert_close(heads[0, 0], torch.tensor([0.4, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(residual, torch.tensor([0.6]), rtol=0, atol=0)
    # Heads summed into one token-level part [0, 1]: prox 1 vs residual 3.
    c = layer_contributions(**kwargs)
    torch.testing.assert_close(c.attention, torch.tensor([[0.25]]), rtol=0, atol=0)
    torch.testing.assert_close(c.attn_residual, torch.tensor([0.75]), rtol=0, atol=0)
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
    # The elementwise form rounds in proportion to ‖z‖₁ (≈ 22), not ‖y‖₁ (≈ 60,000): D = 576
    # rounded terms, whose errors add like a random walk, √D·eps·‖z‖₁ ≈ 6e-5 (Higham & Mary
    # 2019). The worst case D·eps·‖z‖₁ ≈ 1.5e-3 would also pass the naive per-dimension
    # |y_d| − |y_d − z_d| (off by 4e-4 here), which is what this test guards against.
    tol = f32_tol(float(part.abs().sum()), terms=math.isqrt(576))
    assert abs(ours - exact) <= tol
    assert abs(two_sums - exact) > 10 * tol


def test_neuron_contributions_keep_the_sign_and_sum_to_one() -> None:
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(6, 8, generator=gen)
    acts = torch.tensor([2.0, -1.5, 0.0, 0.3, -0.2, 1.0])
    base = torch.randn(8, generator=gen) * 3
    b_out = torch.randn(8, generator=gen) * 0.1
    scale = torch.tensor(0.7)
    whole = base + (acts @ w_out + b_out) * scale
    neurons, bias, residual = neuron_contributions(whole, base, acts, w_out, b_out, scale)
    # float32: 8 shares ≤ 1, normalized by their float32 total and summed again: ~8 eps.
    total = neurons.sum() + bias + residual
    torch.testing.assert_close(total, torch.tensor(1.0), rtol=0, atol=f32_tol(terms=8))
    assert neurons[2] == 0  # a silent neuron writes nothing
    # Neuron 1's part is -1.5·W_out[1]·scale, not +1.5·W_out[1]: recompute both.
    signed = proximity(whole, (acts[1] * w_out[1] * scale)[None])
    flipped = proximity(whole, (-acts[1] * w_out[1] * scale)[None])
    assert not torch.allclose(signed, flipped)
    parts = torch.cat([acts[:, None] * w_out * scale, (b_out * scale)[None], base[None]])
    # The same float32 math, maybe in another order: shares ≤ 1 from sums of D = 8 terms.
    expected = normalize(proximity(whole, parts))[:-2]
    torch.testing.assert_close(neurons, expected, rtol=0, atol=f32_tol(terms=8))


# -- invariants on real (tiny) models ---------------------------------------------------------


def test_engine_matches_slow_loop(tiny_run) -> None:  # type: ignore[no-untyped-def]
    """The math, in float64 on both sides; float32 rounding is tested on its own below."""
    tol = f32_tol()  # shares ≤ 1 computed in float64: only the engine's final float32 cast rounds
    for layer in tiny_run.layers:
        c = layer_contributions(**layer_kwargs64(layer))  # type: ignore[arg-type]
        slow = slow_attention_contributions(layer)
        n = c.attention.shape[0]
        torch.testing.assert_close(c.attention.double(), slow[:, :n], atol=tol, rtol=0)
        torch.testing.assert_close(c.attn_residual.double(), slow[:, n], atol=tol, rtol=0)
        torch.testing.assert_close(c.attn_bias.double(), slow[:, n + 1], atol=tol, rtol=0)
        if layer.resid_mid is None:
            torch.testing.assert_close(c.ffn.double(), slow[:, n + 2], atol=tol, rtol=0)


def test_contributions_are_nonnegative_causal_and_sum_to_one(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        c = contributions_of(layer)
        assert (c.attention >= 0).all() and (c.attn_residual >= 0).all()
        assert (c.ffn >= 0).all() and (c.ffn_residual >= 0).all()
        assert (c.attention.triu(1) == 0).all(), "no contribution from future tokens"
        attn_total = c.attention.sum(1) + c.attn_residual + c.attn_bias
        if layer.resid_mid is None:
            attn_total = attn_total + c.ffn
        # float32 shares ≤ 1, normalized by their float32 total and summed again: K parts
        # (T sources, residual, bias, FFN) round to about K eps, two FFN parts to 2 eps.
        n_parts = c.attention.shape[1] + 3
        ones = torch.ones_like(attn_total)
        torch.testing.assert_close(attn_total, ones, rtol=0, atol=f32_tol(terms=n_parts))
        torch.testing.assert_close(c.ffn + c.ffn_residual, ones, rtol=0, atol=f32_tol(terms=2))


def test_chunked_equals_unchunked(tiny_run) -> None:  # type: ignore[no-untyped-def]
    """In float64, so reordered sums (tiles, threads) differ by ~1e-16 and only the final cast
    to float32 rounds: a missed or repeated tile would be off by a whole share."""
    tol = f32_tol()  # shares ≤ 1: two float32 roundings of nearly equal values, ≤ 1 eps apart
    for layer in tiny_run.layers:
        kwargs = layer_kwargs64(layer)
        one_row = layer_contributions(**kwargs, memory_budget=1, backend="torch")  # type: ignore[arg-type]
        everything = layer_contributions(**kwargs, memory_budget=2**34, backend="torch")  # type: ignore[arg-type]
        torch.testing.assert_close(one_row.attention, everything.attention, atol=tol, rtol=0)
        rows = torch.tensor([3, 0, 7, 1])
        at_rows = kwargs | {"pattern": kwargs["pattern"][:, rows]}  # type: ignore[index]
        heads_small, _ = head_contributions(**at_rows, rows=rows, memory_budget=1)  # type: ignore[arg-type]
        heads_big, _ = head_contributions(**at_rows, rows=rows, memory_budget=2**34)  # type: ignore[arg-type]
        torch.testing.assert_close(heads_small, heads_big, atol=tol, rtol=0)


def test_fused_cpu_kernel_equals_the_torch_version(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        kwargs = layer_kwargs(layer)
        kernel = layer_contributions(**kwargs, backend="kernel")  # type: ignore[arg-type]
        reference = layer_contributions(**kwargs, backend="torch")  # type: ignore[arg-type]
        # float32 shares ≤ 1 from proximities summed over D terms in two orders: D eps.
        tol = f32_tol(terms=layer.resid_pre.shape[-1])
        torch.testing.assert_close(kernel.attention, reference.attention, atol=tol, rtol=0)
        torch.testing.assert_close(kernel.attn_residual, reference.attn_residual, atol=tol, rtol=0)


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
    # Per part: H products summed into each z_d, then two D-term sums (linear, overshoot),
    # at most as large as the part: (H + 2D)·eps·Σ|terms| per part — never eps·‖y‖₁ (> 3,000).
    bound = f32_tol(terms=h + 2 * d) * _parts_l1(pattern, u, scale)  # [T, S]
    assert ((kernel.double() - exact).abs() <= bound).all()
    assert (kernel.triu(1) == 0).all()


def _random_layer(
    n: int, h: int, d: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """whole [T, D] with one massive dimension and exact zeros, a causal pattern [H, T, T],
    head outputs [T, H, D], a post-norm scale [T]."""
    gen = torch.Generator().manual_seed(seed)
    causal = torch.full((n, n), float("-inf")).triu(1)
    pattern = torch.softmax(3 * torch.randn(h, n, n, generator=gen) + causal, -1)
    whole = torch.randn(n, d, generator=gen)
    whole[:, 1] = 2_000.0
    whole[:, 2] = 0.0  # sign(0) = +1 and |y| = 0: every part overshoots here
    u = 4 * torch.randn(n, h, d, generator=gen)
    scale = torch.rand(n, generator=gen) + 0.5
    return whole, pattern, u, scale


@pytest.mark.parametrize(
    ("n", "h"),
    [(1, 1), (17, 3), (33, 4), (40, 5), (19, 6), (21, 7), (16, 8), (70, 9), (23, 13)],
)
def test_fused_kernel_equals_float64_for_any_prompt_length_and_head_count(n: int, h: int) -> None:
    """Prompts within one source block and past it, for head counts below, at and past
    multiples of four: every (query, source) pair exactly once."""
    whole, pattern, u, scale = _random_layer(n, h, 24, seed=n + h)
    kernel = attention_proximity(whole, pattern, u, scale, backend="kernel")
    exact = attention_proximity(
        whole.double(), pattern.double(), u.double(), scale.double(), backend="torch"
    )
    bound = f32_tol(terms=h + 2 * 24) * _parts_l1(pattern, u, scale)
    assert ((kernel.double() - exact).abs() <= bound).all()
    assert (kernel.triu(1) == 0).all()


@pytest.mark.parametrize(
    ("n", "heavy"),
    [(64, 0.05), (65, 0.05), (150, 0.05), (150, 0.0), (150, 2.0), (3, 2.0), (300, 0.05)],
)
def test_token_kernel_any_source_block_and_heavy_split_gives_float64(n: int, heavy: float) -> None:
    """Source blocks of 64 (one exactly full, one source over, a partial third), query blocks
    of 256 (300 tokens: a second one, whose rows start past several source blocks), and pairs
    split at any weight: 0 sends every pair through pass C (every dimension), 2 (above any
    pair's ‖A‖₂ ≤ 1) every pair through the bounded pass B; the proximities are the same."""
    from llm_flow.engine.token_kernel import attention_proximity_cpu

    whole, pattern, u, scale = _random_layer(n, 5, 24, seed=n)
    kernel = attention_proximity_cpu(whole, pattern, u, scale, heavy=heavy)
    exact = attention_proximity(
        whole.double(), pattern.double(), u.double(), scale.double(), backend="torch"
    )
    bound = f32_tol(terms=5 + 2 * 24) * _parts_l1(pattern, u, scale)
    assert ((kernel.double() - exact).abs() <= bound).all()
    assert (kernel.triu(1) == 0).all()


@pytest.mark.parametrize(("n", "h"), [(1, 1), (40, 3), (150, 9)])
def test_token_kernel_linear_term_through_the_head_factors(n: int, h: int) -> None:
    """Given values and W_O, the linear term is computed as d_head-long products
    (sign(y)·W_Oᵀ)·v: the same proximities as from the head outputs, within the rounding of
    products over d_head and over D."""
    gen = torch.Generator().manual_seed(n + h)
    whole, pattern, _, scale = _random_layer(n, h, 24, seed=n + h)
    values = torch.randn(n, h, 8, generator=gen)
    w_o = torch.randn(h, 8, 24, generator=gen)
    u = torch.einsum("shk,hkd->shd", values, w_o)
    kernel = attention_proximity(
        whole, pattern, u, scale, head_factors=(values, w_o), backend="kernel"
    )
    exact = attention_proximity(
        whole.double(), pattern.double(), u.double(), scale.double(), backend="torch"
    )
    # The factored products sum |v|·|W_O| terms: bounded by their size, not the parts' L1.
    factored = torch.einsum("shk,hkd->sh", values.double().abs(), w_o.double().abs())
    terms = torch.einsum("hts,sh->ts", pattern.double(), factored) * scale.double()[:, None]
    bound = f32_tol(terms=h + 2 * 24 + 8) * (_parts_l1(pattern, u, scale) + terms)
    assert ((kernel.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("h", [1, 4, 6, 9])
def test_fused_per_head_kernel_equals_float64(h: int) -> None:
    """Heads four per pass over D: fewer than four, exactly four, a last group overlapping."""
    n, d = 37, 24
    whole, pattern, u, scale = _random_layer(n, h, d, seed=h)
    rows = torch.tensor([36, 0, 5, 20, 17, 36])  # unsorted, repeated, first and last
    at_rows = pattern[:, rows]
    kernel = head_proximity(whole, at_rows, u, scale, rows, backend="kernel")
    exact = head_proximity(
        whole.double(), at_rows.double(), u.double(), scale.double(), rows, backend="torch"
    )
    # One part per (row, source, head): a weight times D products, two D-term sums.
    part_l1 = pattern.double().permute(1, 2, 0)[rows] * u.double().abs().sum(-1)[None]
    bound = f32_tol(terms=2 * d + 1) * part_l1 * scale.double()[rows, None, None]
    assert kernel.shape == (len(rows), n, h)
    assert ((kernel.double() - exact).abs() <= bound).all()
    causal = torch.arange(n)[None, :] <= rows[:, None]
    assert (kernel[~causal] == 0).all()


def test_kernel_choice_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA without the gpu extra keeps the torch path (the package never needs triton)."""
    monkeypatch.setattr(contributions, "triton_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernel_for(torch.device("cuda")) == "torch"
    assert kernel_for(torch.device("cpu")) == "numba"
    assert kernel_for(torch.device("cpu"), torch.float64) == "torch"


def test_float32_agrees_with_float64(tiny_run) -> None:  # type: ignore[no-untyped-def]
    for layer in tiny_run.layers:
        kwargs = layer_kwargs(layer)
        as64 = {k: (v.double() if v is not None else None) for k, v in kwargs.items()}
        c32 = layer_contributions(**kwargs)  # type: ignore[arg-type]
        c64 = layer_contributions(**as64)  # type: ignore[arg-type]
        # Same inputs; float32 shares ≤ 1 from proximities summed over D terms: D eps.
        tol = f32_tol(terms=layer.resid_pre.shape[-1])
        torch.testing.assert_close(c32.attention, c64.attention, atol=tol, rtol=0)
        torch.testing.assert_close(c32.ffn, c64.ffn, atol=tol, rtol=0)


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
        # The engine's float32 path against float64: shares ≤ 1 from D-term sums, D eps.
        tol = f32_tol(terms=whole.shape[-1])
        torch.testing.assert_close(
            heads[i].double().flatten(), expected[: u.shape[0] * n_h], atol=tol, rtol=0
        )
        torch.testing.assert_close(
            residual[i].double(), expected[u.shape[0] * n_h], atol=tol, rtol=0
        )
        assert (heads[i, t + 1 :] == 0).all()


def test_post_norm_scale_changes_the_parts() -> None:
    """Gemma-style 1/rms folding must be used: ignoring it gives parts that don't sum up."""
    llm = tiny_llm("gemma3-postnorm")
    layer = llm.run(prompt(6)).layers[0]
    assert not torch.allclose(layer.attn_scale, torch.ones_like(layer.attn_scale))
    assert layer.pattern is not None
    kwargs = layer_kwargs(layer) | {"attn_scale": torch.ones_like(layer.attn_scale)}
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


def _profiled(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
    """``run()``'s result and the largest allocation (bytes) each op made, from the profiler."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        out = run()
    largest: dict[str, int] = {}
    for event in prof.events():
        largest[event.name] = max(largest.get(event.name, 0), event.cpu_memory_usage)
    return out, largest


def test_attention_proximity_part_tiles_measured_within_the_memory_budget() -> None:
    """The torch path's part vectors, measured: with a small budget every tile the batched
    product allocates (``aten::bmm``, the only op that materializes parts) fits the budget and no
    op allocates a [T, T, D] array; with a large one the same measurement sees that array."""
    gen = torch.Generator().manual_seed(0)
    n, h, d = 64, 3, 32
    pattern = torch.rand(h, n, n, generator=gen).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    whole = torch.randn(n, d, generator=gen)
    u = torch.randn(n, h, d, generator=gen)
    ones = torch.ones(n)
    budget = n * d * 8  # 16 KiB: two float32 sources' parts for a 64-query tile
    all_parts = n * n * d * 4  # bytes of every [T, T, D] part at once (512 KiB)
    small, tiled = _profiled(
        lambda: attention_proximity(whole, pattern, u, ones, memory_budget=budget, backend="torch")
    )
    full, untiled = _profiled(
        lambda: attention_proximity(whole, pattern, u, ones, memory_budget=2**30, backend="torch")
    )
    assert 0 < tiled["aten::bmm"] <= budget, tiled
    assert max(tiled.values()) < all_parts, tiled
    assert untiled["aten::bmm"] == all_parts  # the measurement sees a too-large tile
    # float32 prox from differently tiled products, each side off by ≤ (H + 2D)·eps·Σ|terms|.
    bound = 2 * f32_tol(terms=h + 2 * d) * _parts_l1(pattern, u, ones)
    assert ((small.double() - full.double()).abs() <= bound).all()
