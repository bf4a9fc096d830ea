"""Fused CPU kernels for attention proximities (numba).

The torch path in :mod:`llm_flow.engine.contributions` builds each part vector ``z[t, s]`` (D
floats) in memory before reducing it; on a CPU that is memory-bound and the batched products with
only H inner terms run far below peak. These kernels build parts in a small scratch buffer that
stays in cache and reduce them at once, and they allocate nothing of size T·T·D.

Work is split into tiles of ``QUERY_TILE`` consecutive query rows; inside a tile each source's
head outputs ``u[s]`` (H·D floats) are read once from memory and reused for every query of the
tile, and every inner loop runs over the contiguous model dimension in float32 so LLVM
vectorizes it (``fastmath`` lets it reorder the sums into SIMD partial sums, which also keeps the
rounding error of a D-term sum at about √D·eps rather than D·eps). Tiles are handed to threads
in pairs (i, n − 1 − i): row t costs t + 1 parts, so every thread gets equal work.

Same math as :func:`llm_flow.engine.contributions.attention_proximity` and
:func:`~llm_flow.engine.contributions.head_proximity` (tests hold them equal):
``prox = max(Σ_d a_d − 2·max(a_d − |y_d|, 0), 0)`` with ``a_d = sign(y_d)·z_d``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

QUERY_TILE = 16  # query rows sharing each source's head outputs: 16 rows' sign/|y| fit in L2


# fastmath lets LLVM vectorize the reductions; inputs are finite (the run's self-checks passed).
@njit(fastmath=True, cache=True, inline="always")
def _four(w: np.ndarray, u_s: np.ndarray, h: int) -> tuple:
    """Weights and rows of heads h … h + 3; heads past the last get weight 0 (and row 0)."""
    n_h = u_s.shape[0]
    zero = np.float32(0.0)
    w1, u1 = (w[h + 1], u_s[h + 1]) if h + 1 < n_h else (zero, u_s[0])
    w2, u2 = (w[h + 2], u_s[h + 2]) if h + 2 < n_h else (zero, u_s[0])
    w3, u3 = (w[h + 3], u_s[h + 3]) if h + 3 < n_h else (zero, u_s[0])
    return w[h], u_s[h], w1, u1, w2, u2, w3, u3


@njit(fastmath=True, cache=True)
def _part_prox(
    w: np.ndarray, u_s: np.ndarray, z: np.ndarray, sign: np.ndarray, y_abs: np.ndarray
) -> np.float32:
    """Proximity of the part ``z = Σ_h w[h] · u_s[h]`` to the whole with ``sign``/``y_abs``.

    Heads are added four at a time (one pass over z per four heads, not per head) into the
    scratch ``z``; the last pass adds the final heads and reduces in the same loop, so the part
    is read back once: ``max(Σ_d a_d − 2·Σ_d max(a_d − |y_d|, 0), 0)``, ``a_d = sign_d·z_d``.
    """
    n_h, d_model = u_s.shape
    h = 0
    while h + 4 < n_h:
        w0, u0, w1, u1, w2, u2, w3, u3 = _four(w, u_s, h)
        if h == 0:
            for d in range(d_model):
                z[d] = w0 * u0[d] + w1 * u1[d] + w2 * u2[d] + w3 * u3[d]
        else:
            for d in range(d_model):
                z[d] += w0 * u0[d] + w1 * u1[d] + w2 * u2[d] + w3 * u3[d]
        h += 4
    w0, u0, w1, u1, w2, u2, w3, u3 = _four(w, u_s, h)
    if h == 0:
        for d in range(d_model):
            z[d] = np.float32(0.0)
    linear = np.float32(0.0)
    overshoot = np.float32(0.0)
    for d in range(d_model):
        along = sign[d] * (z[d] + (w0 * u0[d] + w1 * u1[d] + w2 * u2[d] + w3 * u3[d]))
        linear += along
        overshoot += max(along - y_abs[d], np.float32(0.0))
    return max(linear - np.float32(2.0) * overshoot, np.float32(0.0))


@njit(fastmath=True, cache=True)
def _token_tile(
    q0: int,
    q1: int,
    a: np.ndarray,
    u: np.ndarray,
    sign: np.ndarray,
    y_abs: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[t, s] for the queries q0 ≤ t < q1 and every source s ≤ t."""
    z = np.empty(u.shape[2], dtype=np.float32)
    for s in range(min(q1, a.shape[1])):  # causal: sources after the tile's last query add 0
        u_s = u[s]  # read from memory once, reused by every query of the tile from cache
        for t in range(max(q0, s), q1):
            out[t, s] = _part_prox(a[t, s], u_s, z, sign[t], y_abs[t])


@njit(parallel=True, cache=True)
def _attention_prox(
    a: np.ndarray, u: np.ndarray, sign: np.ndarray, y_abs: np.ndarray, out: np.ndarray, tile: int
) -> None:
    """a [T, S, H] pattern·scale (query-major), u [S, H, D], sign/|y| [T, D] → out [T, S]."""
    n_q = a.shape[0]
    n_tiles = (n_q + tile - 1) // tile
    for i in prange((n_tiles + 1) // 2):
        _token_tile(i * tile, min(n_q, (i + 1) * tile), a, u, sign, y_abs, out)
        k = n_tiles - 1 - i
        if k != i:
            _token_tile(k * tile, min(n_q, (k + 1) * tile), a, u, sign, y_abs, out)


@njit(fastmath=True, cache=True)
def _head_tile(
    r0: int,
    r1: int,
    a: np.ndarray,
    u: np.ndarray,
    sign: np.ndarray,
    y_abs: np.ndarray,
    rows: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[r, s, h] for the rows r0 ≤ r < r1 (query t = rows[r]), every source s ≤ t, head h.

    The part is ``w · u[s, h]`` with a single weight w, so ``a_d = w · sign_d · u_d``."""
    n_h, d_model = u.shape[1], u.shape[2]
    last = 0
    for r in range(r0, r1):
        last = max(last, rows[r])
    for s in range(min(last + 1, a.shape[1])):
        u_s = u[s]
        for r in range(r0, r1):
            t = rows[r]
            if s > t:
                continue  # causal: a later source has no part
            for h in range(n_h):
                w = a[r, s, h]
                if w == 0.0:
                    continue  # an exactly-zero part has proximity 0 (out is zeroed)
                linear = np.float32(0.0)
                overshoot = np.float32(0.0)
                for d in range(d_model):
                    along = w * (sign[t, d] * u_s[h, d])
                    linear += along
                    overshoot += max(along - y_abs[t, d], np.float32(0.0))
                prox = linear - np.float32(2.0) * overshoot
                out[r, s, h] = max(prox, np.float32(0.0))


@njit(parallel=True, cache=True)
def _head_prox(
    a: np.ndarray,
    u: np.ndarray,
    sign: np.ndarray,
    y_abs: np.ndarray,
    rows: np.ndarray,
    out: np.ndarray,
    tile: int,
) -> None:
    """a [R, S, H] pattern·scale of the query ``rows`` [R] → out [R, S, H] (in place)."""
    n_r = rows.shape[0]
    n_tiles = (n_r + tile - 1) // tile
    for i in prange((n_tiles + 1) // 2):
        _head_tile(i * tile, min(n_r, (i + 1) * tile), a, u, sign, y_abs, rows, out)
        k = n_tiles - 1 - i
        if k != i:
            _head_tile(k * tile, min(n_r, (k + 1) * tile), a, u, sign, y_abs, rows, out)


def _query_major(pattern: Tensor, scale: Tensor) -> np.ndarray:
    """pattern [H, T, S] · scale [T] → a contiguous (T, S, H) array."""
    return (pattern * scale[None, :, None]).permute(1, 2, 0).contiguous().numpy()


def _signs_and_abs(whole: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """sign(y) with sign(0) = +1, and |y|, as contiguous float32 arrays."""
    sign = torch.where(whole >= 0, 1.0, -1.0).to(torch.float32)
    return sign.contiguous().numpy(), whole.abs().contiguous().numpy()


def attention_proximity_cpu(
    whole: Tensor, pattern: Tensor, head_outputs: Tensor, scale: Tensor
) -> Tensor:
    """float32 CPU tensors: whole [T, D], pattern [H, T, S], head_outputs [S, H, D], scale [T]
    → prox [T, S] (zero for s > t)."""
    sign, y_abs = _signs_and_abs(whole)
    out = np.zeros((whole.shape[0], pattern.shape[-1]), dtype=np.float32)
    u = head_outputs.contiguous().numpy()
    _attention_prox(_query_major(pattern, scale), u, sign, y_abs, out, QUERY_TILE)
    return torch.from_numpy(out)


def head_proximity_cpu(
    whole: Tensor, pattern: Tensor, head_outputs: Tensor, scale: Tensor, rows: Tensor
) -> Tensor:
    """float32 CPU tensors as :func:`attention_proximity_cpu`, but ``pattern`` [H, R, S] holds
    the attention at the query ``rows`` [R] → per-head prox [R, S, H] (zero for s > t)."""
    sign, y_abs = _signs_and_abs(whole)
    n_s, n_h = pattern.shape[-1], pattern.shape[0]
    out = np.zeros((len(rows), n_s, n_h), dtype=np.float32)
    u = head_outputs.contiguous().numpy()
    index = rows.to(torch.int64).contiguous()
    a = _query_major(pattern, scale[index])  # (R, S, H)
    _head_prox(a, u, sign, y_abs, index.numpy(), out, QUERY_TILE)
    return torch.from_numpy(out)
