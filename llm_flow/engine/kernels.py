"""A fused CPU kernel for token-level attention proximities (numba).

The torch path in :mod:`llm_flow.engine.contributions` builds each part vector ``z[t, s]`` (D
floats) in memory before reducing it; on a CPU that is memory-bound and the batched products with
only H inner terms run far below peak. This kernel builds one part at a time in a D-float scratch
buffer that stays in L1 and reduces it at once, parallel over query rows: measured 2.5-3.5×
faster than the tiled torch path on 2 cores (8.6 vs 22 ms per SmolLM2 layer at 256 tokens,
0.14 vs 0.51 s at 1024), and it allocates nothing of size T·T·D.

Same math as :func:`llm_flow.engine.contributions.attention_proximity` (tests hold them equal):
``prox[t, s] = max(Σ_d a_d − 2·max(a_d − |y_d|, 0), 0)`` with ``a_d = sign(y_d)·z_d``,
accumulated in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor


# fastmath lets LLVM vectorize the reductions; inputs are finite (the run's self-checks passed).
@njit(fastmath=True, cache=True)
def _row(t: int, a: np.ndarray, u: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """out[t, s] for every source s ≤ t."""
    n_h = a.shape[2]
    d_model = y.shape[1]
    z = np.empty(d_model, dtype=np.float32)
    sign = np.empty(d_model, dtype=np.float32)
    y_abs = np.empty(d_model, dtype=np.float32)
    for d in range(d_model):
        sign[d] = 1.0 if y[t, d] >= 0 else -1.0
        y_abs[d] = abs(y[t, d])
    for s in range(min(t + 1, a.shape[1])):  # causal: later sources have no part
        for d in range(d_model):
            z[d] = 0.0
        for h in range(n_h):
            w = a[t, s, h]
            if w != 0.0:
                for d in range(d_model):
                    z[d] += w * u[s, h, d]
        linear = 0.0
        overshoot = 0.0
        for d in range(d_model):
            along = sign[d] * z[d]
            linear += along
            excess = along - y_abs[d]
            if excess > 0:
                overshoot += excess
        prox = linear - 2.0 * overshoot
        out[t, s] = prox if prox > 0 else 0.0


@njit(parallel=True, cache=True)
def _attention_prox(a: np.ndarray, u: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """a [T, S, H] pattern·scale (query-major), u [S, H, D], y [T, D] → out [T, S] (in place).

    Row t costs t + 1 parts, so rows are paired (t, T−1−t) to give every thread equal work.
    """
    n_q = a.shape[0]
    for i in prange((n_q + 1) // 2):
        _row(i, a, u, y, out)
        if n_q - 1 - i != i:
            _row(n_q - 1 - i, a, u, y, out)


def attention_proximity_cpu(
    whole: Tensor, pattern: Tensor, head_outputs: Tensor, scale: Tensor
) -> Tensor:
    """float32 CPU tensors: whole [T, D], pattern [H, T, S], head_outputs [S, H, D], scale [T]
    → prox [T, S] (zero for s > t)."""
    a = (pattern * scale[None, :, None]).permute(1, 2, 0).contiguous()  # (T, S, H)
    out = np.zeros((whole.shape[0], pattern.shape[-1]), dtype=np.float32)
    _attention_prox(a.numpy(), head_outputs.contiguous().numpy(), whole.contiguous().numpy(), out)
    return torch.from_numpy(out)
