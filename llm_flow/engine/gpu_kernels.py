"""Triton kernels for the attention proximities of :mod:`llm_flow.engine.contributions` on CUDA.

The same math as the torch path (tests hold them equal): for the part ``z`` of a whole ``y``,
``prox = max(Σ_d a_d − 2·max(a_d − |y_d|, 0), 0)`` with ``a_d = sign(y_d)·z_d``, ``sign(0) = +1``
(Ferrando & Voita 2024, arXiv 2403.00824, §3, written without cancellation). Token-level parts
are ``z[t, s] = scale[t]·Σ_h A[h, t, s]·u[s, h]``, per-head parts ``scale[t]·A[h, t, s]·u[s, h]``.

One program per (query block, source block) tile builds its parts in registers, D block by D
block, and reduces them at once: no part vector ever reaches memory, where the torch path writes
every one of them (T²/2 · D floats per layer) before reducing it. Tiles above the causal
diagonal exit at once and leave their zeros. Whatever the input dtype, values are upcast to
float32 as they are loaded and every sum accumulates in float32 (half-precision sums changed
contributions by up to 0.3). The token-level kernel builds a tile's parts, Σ_h over the heads, as
one batched matrix product per source on the tensor cores (``tl.dot`` with ``tf32x3``: three
TF32 products per term, float32 accuracy); the heads' sum is what made the CUDA-core version
slow (H multiply-adds per element against the reduction's few).

The kernels are compiled for CUDA tensors. With ``TRITON_INTERPRET=1`` set before triton is first
imported, Triton's interpreter runs them on CPU tensors instead: that is how they are tested
without a GPU (the mode is fixed for the whole process at that import, triton's standard library
included). This module imports triton: import it only once triton is known to be installed
(:func:`llm_flow.engine.contributions.kernel_for` checks).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from llm_flow.errors import DeviceError, KernelError

# Tile sizes of the per-head kernel: a [Q, S, D] float32 block of parts lives in registers
# (16·16·32 = 8192 floats, 64 per thread with 4 warps).
BLOCK_Q = 16
BLOCK_S = 16
BLOCK_D = 32
NUM_WARPS = 4
# The token-level kernel keeps a tile's head outputs [S, H, D] (float32) and its pattern in
# shared memory for the tensor cores: 4 sources per tile, fewer where the head outputs would take
# more than this many bytes (past 64 heads). Timed on an H200 with scripts/triton_tiles.py:
# 16 query x 4 source x 32 model tiles with 4 warps ran a Llama-3.1-8B-shaped layer (32 heads,
# 4096 wide) in 64 ms at 4096 tokens and 4.3 ms at 1024, against 344 / 22 ms for the CUDA-core
# kernel it replaced; 8 or 16 sources ran 1.7-2.2x slower, and wider tiles ran out of shared
# memory (232 KB there).
TOKEN_TILE_BYTES = 32 * 1024


def heads_block(n_heads: int) -> int:
    """Heads padded to a power of two, at least 16: the tensor cores' smallest inner size."""
    return max(16, triton.next_power_of_2(n_heads))


def token_tiles(n_heads: int) -> tuple[int, int, int, int]:
    """(query, source and model block sizes, warps) of the token-level kernel for ``n_heads``."""
    block_s = TOKEN_TILE_BYTES // (4 * heads_block(n_heads) * BLOCK_D)
    return BLOCK_Q, max(1, min(4, block_s)), BLOCK_D, NUM_WARPS


@triton.jit
def _attention_prox_kernel(
    y_ptr,  # whole [T, D]
    a_ptr,  # pattern [H, T, S]
    u_ptr,  # head outputs [S, H, D]
    scale_ptr,  # [T]
    out_ptr,  # prox [T, S], float32, zero-filled
    n_q,
    n_s,
    n_heads,
    d_model,
    y_st,
    y_sd,
    a_sh,
    a_st,
    a_ss,
    u_ss,
    u_sh,
    u_sd,
    out_st,
    out_ss,
    BLOCK_Q: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
) -> None:
    q0 = tl.program_id(0) * BLOCK_Q
    s0 = tl.program_id(1) * BLOCK_S
    if s0 < q0 + BLOCK_Q:  # causal: a tile wholly above the diagonal has no parts
        t = q0 + tl.arange(0, BLOCK_Q)
        s = s0 + tl.arange(0, BLOCK_S)
        h = tl.arange(0, BLOCK_H)
        t64 = t.to(tl.int64)  # offsets in int64: H·T·S passes 2³¹ at 8k tokens
        s64 = s.to(tl.int64)
        h64 = h.to(tl.int64)
        t_ok = t < n_q
        s_ok = s < n_s
        h_ok = h < n_heads
        live = s_ok[:, None] & t_ok[None, :] & (s[:, None] <= t[None, :])  # (S, Q)
        w = tl.load(scale_ptr + t64, mask=t_ok, other=0.0).to(tl.float32)
        # Every head's weights of the tile, read once: a[s, t, h] = pattern[h, t, s] · scale[t]
        # (pattern·scale first, as the torch path does: the same products).
        a_ptrs = a_ptr + s64[:, None, None] * a_ss + t64[None, :, None] * a_st
        a_ptrs += h64[None, None, :] * a_sh
        a_ok = live[:, :, None] & h_ok[None, None, :]
        a = tl.load(a_ptrs, mask=a_ok, other=0.0).to(tl.float32) * w[None, :, None]  # (S, Q, H)
        linear = tl.zeros((BLOCK_S, BLOCK_Q), dtype=tl.float32)
        overshoot = tl.zeros((BLOCK_S, BLOCK_Q), dtype=tl.float32)
        for d0 in range(0, d_model, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d64 = d.to(tl.int64)
            d_ok = d < d_model
            u_ptrs = u_ptr + s64[:, None, None] * u_ss + h64[None, :, None] * u_sh
            u_ptrs += d64[None, None, :] * u_sd
            u_ok = s_ok[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :]
            u = tl.load(u_ptrs, mask=u_ok, other=0.0).to(tl.float32)  # (S, H, D)
            # One batched product per source on the tensor cores; three TF32 products per
            # term (tf32x3) keep float32 accuracy.
            z = tl.dot(a, u, input_precision="tf32x3")  # (S, Q, D): part of s at query t
            y_ptrs = y_ptr + t64[:, None] * y_st + d64[None, :] * y_sd
            y = tl.load(y_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            along = z * tl.where(y >= 0, 1.0, -1.0)[None, :, :]  # a_d = sign(y_d)·z_d
            linear += tl.sum(along, axis=2)
            overshoot += tl.sum(tl.maximum(along - tl.abs(y)[None, :, :], 0.0), axis=2)
        prox = tl.where(live, tl.maximum(linear - 2.0 * overshoot, 0.0), 0.0)  # (S, Q)
        out_ptrs = out_ptr + t64[None, :] * out_st + s64[:, None] * out_ss
        tl.store(out_ptrs, prox, mask=s_ok[:, None] & t_ok[None, :])


@triton.jit
def _head_prox_kernel(
    y_ptr,  # whole [T, D]
    a_ptr,  # pattern at the rows [H, R, S]
    u_ptr,  # head outputs [S, H, D]
    scale_ptr,  # [T]
    rows_ptr,  # query positions [R], int64
    out_ptr,  # prox [R, S, H], float32, zero-filled
    n_rows,
    n_s,
    n_heads,
    d_model,
    y_st,
    y_sd,
    a_sh,
    a_sr,
    a_ss,
    u_ss,
    u_sh,
    u_sd,
    out_sr,
    out_ss,
    out_sh,
    BLOCK_Q: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    r = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    s0 = tl.program_id(1) * BLOCK_S
    r_ok = r < n_rows
    t = tl.load(rows_ptr + r, mask=r_ok, other=0)  # int64 positions, in any order
    if s0 <= tl.max(tl.where(r_ok, t, -1), axis=0):  # causal: no source after the last row
        s = s0 + tl.arange(0, BLOCK_S)
        s64 = s.to(tl.int64)
        s_ok = s < n_s
        live = r_ok[:, None] & s_ok[None, :] & (s[None, :] <= t[:, None])  # (R, S)
        w = tl.load(scale_ptr + t, mask=r_ok, other=0.0).to(tl.float32)
        r64 = r.to(tl.int64)
        a_ptrs = a_ptr + r64[:, None] * a_sr + s64[None, :] * a_ss  # (R, S), head 0
        out_ptrs = out_ptr + r64[:, None] * out_sr + s64[None, :] * out_ss
        u_h = u_ptr + s64[:, None] * u_ss  # (S, 1), head 0
        for _ in range(n_heads):  # pointers step by a stride: h·stride could pass 2³¹
            # pattern·scale first, as the torch path does: the same products.
            a = tl.load(a_ptrs, mask=live, other=0.0).to(tl.float32) * w[:, None]
            linear = tl.zeros((BLOCK_Q, BLOCK_S), dtype=tl.float32)
            overshoot = tl.zeros((BLOCK_Q, BLOCK_S), dtype=tl.float32)
            for d0 in range(0, d_model, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d64 = d.to(tl.int64)
                d_ok = d < d_model
                y_ptrs = y_ptr + t[:, None] * y_st + d64[None, :] * y_sd
                y = tl.load(y_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
                y = y.to(tl.float32)
                u_ptrs = u_h + d64[None, :] * u_sd
                u = tl.load(u_ptrs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
                z = a[:, :, None] * u.to(tl.float32)[None, :, :]  # (R, S, D)
                along = z * tl.where(y >= 0, 1.0, -1.0)[:, None, :]  # a_d = sign(y_d)·z_d
                linear += tl.sum(along, axis=2)
                overshoot += tl.sum(tl.maximum(along - tl.abs(y)[:, None, :], 0.0), axis=2)
            prox = tl.where(live, tl.maximum(linear - 2.0 * overshoot, 0.0), 0.0)
            tl.store(out_ptrs, prox, mask=r_ok[:, None] & s_ok[None, :])
            a_ptrs += a_sh
            u_h += u_sh
            out_ptrs += out_sh


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when triton was
    first imported): then they take CPU tensors; compiled, they take CUDA tensors only."""
    return not isinstance(_attention_prox_kernel, triton.runtime.JITFunction)


# What Triton raises when a kernel does not compile or does not fit the GPU (the names differ
# across Triton versions).
_COMPILE_ERRORS: tuple[type[Exception], ...] = tuple(
    error
    for error in (
        getattr(triton.runtime.errors, "OutOfResources", None),
        getattr(triton.runtime.errors, "PTXASError", None),
        getattr(triton.compiler.errors, "CompilationError", None),
    )
    if isinstance(error, type)
)


def _launch(kernel: Any, grid: tuple[int, int], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``; a kernel that does not compile here raises
    :class:`KernelError` in words (its first line kept)."""
    try:
        kernel[grid](*args, **meta)
    except _COMPILE_ERRORS as exc:
        what = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise KernelError(
            f"the Triton kernel {getattr(kernel, '__name__', '')} does not run on this GPU ({what})"
        ) from exc


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not interpreted():
        raise DeviceError(
            f"the Triton kernels need CUDA tensors, not {device.type} ones (on a CPU they run "
            "only in Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported)"
        )


def attention_proximity_triton(
    whole: Tensor,
    pattern: Tensor,
    head_outputs: Tensor,
    scale: Tensor,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """whole [T, D], pattern [H, T, S], head_outputs [S, H, D], scale [T], on one device, any
    float dtype → prox [T, S] float32 (zero for s > t). ``tiles``: (query, source and model
    block sizes, warps per program), powers of two, query and model blocks at least 16 (default
    :func:`token_tiles`); scripts/triton_tiles.py times choices."""
    n_q, d_model = whole.shape
    n_heads, _, n_s = pattern.shape
    block_q, block_s, block_d, num_warps = tiles or token_tiles(n_heads)
    out = torch.zeros(n_q, n_s, dtype=torch.float32, device=whole.device)
    if out.numel() == 0 or d_model == 0:
        return out
    grid = (triton.cdiv(n_q, block_q), triton.cdiv(n_s, block_s))
    _check_device(whole.device)
    _launch(
        _attention_prox_kernel,
        grid,
        whole,
        pattern,
        head_outputs,
        scale,
        out,
        n_q,
        n_s,
        n_heads,
        d_model,
        *whole.stride(),
        *pattern.stride(),
        *head_outputs.stride(),
        *out.stride(),
        BLOCK_Q=block_q,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        BLOCK_H=heads_block(n_heads),
        num_warps=num_warps,
    )
    return out


def head_proximity_triton(
    whole: Tensor, pattern: Tensor, head_outputs: Tensor, scale: Tensor, rows: Tensor
) -> Tensor:
    """As :func:`attention_proximity_triton`, per head, for the query ``rows`` [R] (any order),
    with ``pattern`` [H, R, S] the attention at those rows → prox [R, S, H] float32 (zero for
    s > rows[r])."""
    n_heads, _, n_s = pattern.shape
    d_model = whole.shape[-1]
    rows = rows.to(device=whole.device, dtype=torch.int64)
    out = torch.zeros(len(rows), n_s, n_heads, dtype=torch.float32, device=whole.device)
    if out.numel() == 0 or d_model == 0:
        return out
    grid = (triton.cdiv(len(rows), BLOCK_Q), triton.cdiv(n_s, BLOCK_S))
    _check_device(whole.device)
    _launch(
        _head_prox_kernel,
        grid,
        whole,
        pattern,
        head_outputs,
        scale,
        rows,
        out,
        len(rows),
        n_s,
        n_heads,
        d_model,
        *whole.stride(),
        *pattern.stride(),
        *head_outputs.stride(),
        *out.stride(),
        BLOCK_Q=BLOCK_Q,
        BLOCK_S=BLOCK_S,
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )
    return out
