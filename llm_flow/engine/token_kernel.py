"""The token-level attention proximities on a CPU (numba): exact, with the work that cannot be
a matrix product done only where it can be non-zero.

Each part is ``z[t, s] = scale[t] · Σ_h A[h, t, s] · u[s, h]`` and its proximity (see
:mod:`llm_flow.engine.contributions`) splits into a linear term and an overshoot,

    prox[t, s] = max(lin[t, s] − 2 · over[t, s], 0),
    lin[t, s]  = Σ_d a_d = scale[t] · Σ_h A[h, t, s] · (sign(y_t) · u[s, h]),
    over[t, s] = Σ_d max(a_d − |y_td|, 0),       a_d = sign(y_td) · z[t, s]_d.

**The linear term is matrix products.** ``sign(y_t) · u[s, h] = (sign(y_t) · W_O[h]ᵀ) · v[s, h]``:
with the values and ``W_O`` at hand ("factors") that is a d_head-long product per head, as cheap
as the model's own attention scores; without them, a D-long one. Only query blocks' causal
sources are computed.

**The overshoot is non-zero only where a part outgrows the whole in a dimension**, and Cauchy-
Schwarz over heads bounds every part: ``|z[t, s]_d| ≤ |scale[t]| · ‖A[:, t, s]‖₂ · ‖u[s, :, d]‖₂``.
Measured on SmolLM2 at 1024 tokens, a pair has 0.2-0.4 overshooting dimensions of 576 on average;
the bound leaves 1-3 to look at. Queries go in blocks of :data:`QUERY_BLOCK` rows, each through
three passes:

- pass A (per query row): ``lin``, the pair weights ``w[t, s] = ‖A[:, t, s]‖₂``, per block of
  :data:`SOURCE_BLOCK` sources the largest weight of its "light" pairs (``w ≤`` :data:`HEAVY`),
  and the row's weights copied block-major (read from [H, T, S] in pass B, nine rows 4 MB apart
  per query cost a TLB miss each, more than the arithmetic);
- pass B (per source block, whose head outputs then stay in cache): for each query and dimension
  where ``|scale| · (largest light weight) · (largest ‖u[s, :, d]‖₂ of the block)`` reaches
  ``|y_td|``, the block's parts in that dimension exactly, summed into ``over``;
- pass C (per query row): every dimension of the few heavy pairs (attention sinks, the previous
  token), where the bound would pass nearly everywhere, then the proximities.

Dimensions the bound rules out add exactly 0, so nothing is approximated: tests hold this equal to
the float64 torch path within float32 rounding. A SmolLM2 layer at 1024 tokens on the 2-core CPU
takes 34 ms against 70-82 ms for the dense kernel it replaced (every part built over all D); at
256 tokens they are even, and below ~200 this one is up to half a millisecond a layer slower.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from llm_flow.engine.kernels import head_major, signs_and_abs

# Sources per block in pass B. The loops over a block's sources are what LLVM vectorizes: at 64
# they run as four AVX-512 registers; at 32 they fell to scalar code (measured, 2× slower).
SOURCE_BLOCK = 64
# Pairs whose weights' L2 norm over heads exceed this get every dimension in pass C (~1-3 % of
# pairs on SmolLM2); below it they are "light" and bounded per block in pass B.
HEAVY = 0.05
# The bound is compared in float32: widened by this factor (far above the rounding of the norms),
# a dimension on the edge is looked at rather than missed.
MARGIN = np.float32(1.0001)
# Query rows per block: one matrix product of the linear term, one set of working rows (their
# memory: 256 × T × (3 + H) floats, 9 MB for SmolLM2 at 1024 tokens).
QUERY_BLOCK = 256


@njit(fastmath=True, cache=True)
def _weights_row(
    t: int,
    r: int,
    pattern: np.ndarray,
    dots: np.ndarray,
    scratch: tuple,
    heavy: np.float32,
) -> None:
    """Pass A for query t, row r of its query block: lin[r, s] = Σ_h A·dots (unscaled),
    weight[r, s] = ‖A[:, t, s]‖₂, over[r] zeroed, light[r, b] = the largest weight ≤ ``heavy``
    of source block b, and the row's weights copied block-major for pass B (0 past t)."""
    lin, weight, over, light, a_blocks = scratch
    n_h, n_s = pattern.shape[0], min(t + 1, pattern.shape[2])
    n_b = (n_s + SOURCE_BLOCK - 1) // SOURCE_BLOCK
    zero = np.float32(0.0)
    for s in range(n_b * SOURCE_BLOCK):
        lin[r, s] = zero
        weight[r, s] = zero
        over[r, s] = zero
    for h in range(n_h):
        row = pattern[h, t]
        for s in range(n_s):
            a = row[s]
            lin[r, s] += a * dots[h, r, s]
            weight[r, s] += a * a
        for b in range(n_b):
            s0 = b * SOURCE_BLOCK
            if s0 + SOURCE_BLOCK <= n_s:
                for j in range(SOURCE_BLOCK):
                    a_blocks[b, r, h, j] = row[s0 + j]
            else:  # the block holding t (or the last source): later sources add 0
                for j in range(SOURCE_BLOCK):
                    a_blocks[b, r, h, j] = row[s0 + j] if s0 + j < n_s else zero
    for s in range(n_s):
        weight[r, s] = np.sqrt(weight[r, s]) * MARGIN
    for b in range(n_b):
        top = zero
        for s in range(b * SOURCE_BLOCK, (b + 1) * SOURCE_BLOCK):
            w = weight[r, s]
            top = max(top, w if w <= heavy else zero)
        light[r, b] = top


@njit(parallel=True, fastmath=True, cache=True)
def _pass_a(
    q0: int, pattern: np.ndarray, dots: np.ndarray, scratch: tuple, heavy: np.float32
) -> None:
    """Pass A for the queries q0 … q0 + len(dots[0]) − 1 (rows of similar length)."""
    for r in prange(dots.shape[1]):
        _weights_row(q0 + r, r, pattern, dots, scratch, heavy)


@njit(fastmath=True, cache=True)
def _light_block(b: int, q0: int, n_rows: int, inputs: tuple, scratch: tuple) -> None:
    """Pass B for source block b and the ``n_rows`` queries from q0: over[r, s] += the
    overshoot of the block's parts at every query t ≥ its first source, in the dimensions the
    bound cannot rule out. ``inputs``: scale [T], u_blocks, u_top, sign and |y| [T, D]."""
    scale, u_blocks, u_top, sign, y_abs = inputs
    _, _, over, light, a_blocks = scratch
    n_h, d_model = a_blocks.shape[2], y_abs.shape[1]
    zero, half = np.float32(0.0), np.float32(0.5)
    s0 = b * SOURCE_BLOCK
    u_b, top_b = u_blocks[b], u_top[b]  # [D, H, block], [D]
    z = np.empty(SOURCE_BLOCK, dtype=np.float32)
    acc = np.empty(SOURCE_BLOCK, dtype=np.float32)
    dims = np.empty(d_model, dtype=np.int64)
    for r in range(max(0, s0 - q0), n_rows):
        t = q0 + r
        bound = abs(scale[t]) * light[r, b]
        y_t = y_abs[t]
        n_dims = 0
        for d in range(d_model):  # branch-free: the index is kept when the bound reaches |y|
            dims[n_dims] = d
            n_dims += 1 if bound * top_b[d] > y_t[d] else 0
        if n_dims == 0:
            continue
        a = a_blocks[b, r]  # [H, block]: this query's weights on the block
        for j in range(SOURCE_BLOCK):
            acc[j] = zero
        for k in range(n_dims):
            d = dims[k]
            sy, ay = sign[t, d] * scale[t], y_t[d]
            for j in range(SOURCE_BLOCK):
                z[j] = a[0, j] * u_b[d, 0, j]
            for h in range(1, n_h):
                for j in range(SOURCE_BLOCK):
                    z[j] += a[h, j] * u_b[d, h, j]
            for j in range(SOURCE_BLOCK):
                x = sy * z[j] - ay
                acc[j] += half * (x + abs(x))  # max(x, 0), exactly, in a form LLVM vectorizes
        for j in range(SOURCE_BLOCK):
            over[r, s0 + j] += acc[j]


@njit(parallel=True, fastmath=True, cache=True)
def _pass_b(q0: int, n_rows: int, inputs: tuple, scratch: tuple) -> None:
    """Pass B over the source blocks up to the query block's last query. The blocks past its
    first query serve fewer rows, so blocks go to threads in pairs (i, n − 1 − i). Each writes
    only its own columns of ``over``."""
    n_b = (q0 + n_rows + SOURCE_BLOCK - 1) // SOURCE_BLOCK
    for i in prange((n_b + 1) // 2):
        _light_block(i, q0, n_rows, inputs, scratch)
        k = n_b - 1 - i
        if k != i:
            _light_block(k, q0, n_rows, inputs, scratch)


@njit(fastmath=True, cache=True)
def _heavy_row(
    t: int, r: int, inputs: tuple, scratch: tuple, out: np.ndarray, z: np.ndarray
) -> None:
    """Pass C for query t (row r of its block): the overshoot of its heavy pairs over every
    dimension, then out[t, s] = max(scale · lin − 2 · over, 0). ``inputs``: pattern, scale,
    u [H, S, D], sign and |y| [T, D], and the weight above which a pair is heavy."""
    pattern, scale, u, sign, y_abs, heavy = inputs
    lin, weight, over, _, _ = scratch
    n_h, d_model = pattern.shape[0], y_abs.shape[1]
    zero, st = np.float32(0.0), scale[t]
    for s in range(min(t + 1, pattern.shape[2])):
        if weight[r, s] > heavy:
            for d in range(d_model):
                z[d] = zero
            for h in range(n_h):
                a = pattern[h, t, s]
                for d in range(d_model):
                    z[d] += a * u[h, s, d]
            total = zero
            for d in range(d_model):
                total += max(sign[t, d] * st * z[d] - y_abs[t, d], zero)
            over[r, s] = total
        out[t, s] = max(st * lin[r, s] - np.float32(2.0) * over[r, s], zero)


@njit(parallel=True, fastmath=True, cache=True)
def _pass_c(q0: int, n_rows: int, inputs: tuple, scratch: tuple, out: np.ndarray) -> None:
    """Pass C over the query block's rows."""
    for r in prange(n_rows):
        z = np.empty(inputs[2].shape[2], dtype=np.float32)
        _heavy_row(q0 + r, r, inputs, scratch, out, z)


@njit(parallel=True, fastmath=True, cache=True)
def _source_blocks(u: np.ndarray, u_blocks: np.ndarray, u_top: np.ndarray) -> None:
    """u [H, S, D] → u_blocks[b, d, h, j] = u[h, b·block + j, d] (0 past the last source) and
    u_top[b, d] = max over the block's sources of ‖u[:, s, d]‖₂."""
    n_h, n_s, d_model = u.shape
    for b in prange(u_blocks.shape[0]):
        norm2 = np.zeros((SOURCE_BLOCK, d_model), dtype=np.float32)
        for j in range(SOURCE_BLOCK):
            s = b * SOURCE_BLOCK + j
            for h in range(n_h):
                if s >= n_s:  # past the last source: zeros, which no bound or part counts
                    u_blocks[b, :, h, j] = 0.0
                    continue
                for d in range(d_model):
                    x = u[h, s, d]
                    u_blocks[b, d, h, j] = x
                    norm2[j, d] += x * x
        for d in range(d_model):
            top = np.float32(0.0)
            for j in range(SOURCE_BLOCK):
                top = max(top, norm2[j, d])
            u_top[b, d] = np.sqrt(top) * MARGIN


def _linear_factors(
    sign: Tensor, u: Tensor, factors: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """(left [H, T, k], right [H, k, S]) whose product is ``sign(y_t) · u[s, h]`` [H, T, S]:
    k = d_head through the factors when given (values [S, H, dh], W_O [H, dh, D]), else D."""
    if factors is None:
        return sign.expand(u.shape[0], -1, -1), u.transpose(1, 2).contiguous()
    values, w_o = factors
    n_h, d_head, d_model = w_o.shape
    # One product for every head: [T, D] @ [D, H·dh].
    left = sign @ w_o.permute(2, 0, 1).reshape(d_model, n_h * d_head)
    return left.view(-1, n_h, d_head).transpose(0, 1).contiguous(), values.permute(
        1, 2, 0
    ).contiguous()


def attention_proximity_cpu(
    whole: Tensor,
    pattern: Tensor,
    head_outputs: Tensor,
    scale: Tensor,
    factors: tuple[Tensor, Tensor] | None = None,
    *,
    heavy: float = HEAVY,
) -> Tensor:
    """float32 CPU tensors: whole [T, D], pattern [H, T, S], head_outputs [S, H, D], scale [T]
    → prox [T, S] (zero for s > t). ``factors``: (values [S, H, d_head], W_O [H, d_head, D]) with
    ``head_outputs[s, h] = values[s, h] @ W_O[h]``, for the cheaper linear term. ``heavy``: the
    weight above which a pair gets every dimension (any value gives the same proximities)."""
    sign, y_abs = signs_and_abs(whole)
    n_q, d_model = whole.shape
    n_h, n_s = pattern.shape[0], pattern.shape[2]
    u = head_major(head_outputs)  # [H, S, D]
    n_b = (n_s + SOURCE_BLOCK - 1) // SOURCE_BLOCK
    width, n_rows = n_b * SOURCE_BLOCK, min(n_q, QUERY_BLOCK)
    u_blocks = np.empty((n_b, d_model, n_h, SOURCE_BLOCK), dtype=np.float32)
    u_top = np.empty((n_b, d_model), dtype=np.float32)
    _source_blocks(u, u_blocks, u_top)
    a = pattern.contiguous().numpy()
    sc = scale.contiguous().numpy()
    # One query block's working rows (lin, weight, over, light, the weights block-major).
    f32 = np.float32
    scratch = (
        np.empty((n_rows, width), dtype=f32),
        np.empty((n_rows, width), dtype=f32),
        np.empty((n_rows, width), dtype=f32),
        np.empty((n_rows, n_b), dtype=f32),
        np.empty((n_b, n_rows, n_h, SOURCE_BLOCK), dtype=f32),
    )
    out = np.zeros((n_q, n_s), dtype=f32)
    h = np.float32(heavy)
    left, right = _linear_factors(torch.from_numpy(sign), torch.from_numpy(u), factors)
    for q0 in range(0, n_q, QUERY_BLOCK):
        q1 = min(n_q, q0 + QUERY_BLOCK)
        dots = torch.bmm(left[:, q0:q1], right[:, :, :q1]).numpy()  # [H, q, q1], causal sources
        _pass_a(q0, a, dots, scratch, h)
        _pass_b(q0, q1 - q0, (sc, u_blocks, u_top, sign, y_abs), scratch)
        _pass_c(q0, q1 - q0, (a, sc, u, sign, y_abs, h), scratch, out)
    return torch.from_numpy(out)
