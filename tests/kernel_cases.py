"""Inputs for the attention proximity kernels, and the rounding bounds they are held to.

Shared by the Triton tests (interpreter and CUDA) and the CUDA checks; nothing here needs triton.
"""

from __future__ import annotations

import torch

from tests.conftest import f32_tol

AttentionInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def attention_inputs(
    n: int,
    n_heads: int,
    d_model: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    causal: bool = True,
) -> AttentionInputs:
    """(whole [T, D], pattern [H, T, T], head_outputs [T, H, D], scale [T]) with the cases the
    elementwise form must get right: whole dimensions that are exactly 0 (sign(0) = +1), one
    massive dimension, and head outputs large enough that parts overshoot the whole."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else torch.zeros(n, n)
    pattern = torch.softmax(torch.randn(n_heads, n, n, generator=gen) + mask, -1)
    whole = torch.randn(n, d_model, generator=gen) * 0.5
    whole[:, ::5] = 0.0
    whole[:, min(1, d_model - 1)] = 300.0
    u = torch.randn(n, n_heads, d_model, generator=gen) * 2.0
    scale = torch.rand(n, generator=gen) + 0.5
    return tuple(x.to(device=device, dtype=dtype) for x in (whole, pattern, u, scale))  # type: ignore[return-value]


def overshoots(inputs: AttentionInputs) -> bool:
    """Whether some token-level part has a_d > |y_d| (the clamped term is exercised)."""
    whole, pattern, u, scale = (x.double() for x in inputs)
    z = torch.einsum("hts,shd->tsd", pattern, u) * scale[:, None, None]  # (T, S, D)
    sign = torch.where(whole >= 0, 1.0, -1.0).double()
    return bool((z * sign[:, None, :] > whole.abs()[:, None, :]).any())


def token_bound(inputs: AttentionInputs) -> torch.Tensor:
    """[T, S]: how far two float32 computations of token-level prox may differ. Per part, H
    products summed into each z_d, then two D-term sums (linear, overshoot), none larger than
    the part: (H + 2D)·eps·Σ|terms| on each side — never eps·‖y‖₁ (‖y‖₁ > 300 here)."""
    _, pattern, u, scale = (x.double() for x in inputs)
    n_heads, d_model = u.shape[1], u.shape[2]
    terms = torch.einsum("hts,sh->ts", pattern.abs(), u.abs().sum(-1)) * scale.abs()[:, None]
    return 2 * f32_tol(terms=n_heads + 2 * d_model) * terms


def head_bound(inputs: AttentionInputs, rows: torch.Tensor) -> torch.Tensor:
    """[R, S, H]: as :func:`token_bound` for per-head parts (one product per z_d, 1 + 2D);
    ``inputs`` hold the whole pattern [H, T, S]."""
    _, pattern, u, scale = (x.double() for x in inputs)
    d_model = u.shape[2]
    rows = rows.to(pattern.device)
    a = pattern[:, rows, :].abs().permute(1, 2, 0) * scale[rows].abs()[:, None, None]  # (R, S, H)
    return 2 * f32_tol(terms=1 + 2 * d_model) * a * u.abs().sum(-1)[None]
