"""ALTI-style contributions of parts to a whole (Ferrando & Voita 2024, "Information Flow Routes",
arXiv 2403.00824, §3; after Ferrando et al. 2022, ALTI).

A block writes a sum into the residual stream, ``y = Σ_k z_k`` (the previous residual is one of
the parts). The importance of part k is its proximity to the whole,

    prox_k = max(‖y‖₁ − ‖y − z_k‖₁, 0),      c_k = prox_k / Σ_j prox_j.

``prox`` is always computed elementwise, ``Σ_d (|y_d| − |y_d − z_{k,d}|)``, with at least float32
accumulation: residual L1 norms reach ~67,000 in SmolLM2 and subtracting two such sums loses
~1e-3. Each term is evaluated without cancellation: with ``a_d = sign(y_d) · z_d``,

    |y_d| − |y_d − z_d| = min(a_d, 2|y_d| − a_d) = a_d − 2 · max(a_d − |y_d|, 0)

(``sign(0) = +1``), so a part that is small next to a massive residual dimension is not lost to
the rounding of ``y_d − z_d``. A part that is exactly zero (a missing bias, a future token) has
prox 0.

Attention parts of query t are ``z[t, s] = scale[t] · Σ_h A[h, t, s] · u[s, h]`` with
``u[s, h] = v[s, h] @ W_O[h]`` (the per-source head outputs). They are never materialized as
[T, T, H, D]: query positions are processed in chunks under a memory budget, and only sources
``s < end of chunk`` are touched (causal attention gives zero parts elsewhere).

Everything here is pure tensor math: no model, no I/O.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import Tensor

from llm_flow.errors import KernelError

Backend = Literal["auto", "torch", "kernel", "triton"]
QUERY_TILE = 64  # query rows per tile: enough rows for the batched products to run well


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half precision: measured error of
    computing the L1 sums in fp16 reached 0.3 in contribution)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def signs(y: Tensor) -> Tensor:
    """sign(y) with sign(0) = +1, as the elementwise identity above needs.

    Built from the comparison's 0/1 rather than ``torch.where(y >= 0, 1.0, -1.0)``: on a CPU the
    select took 1.15 ms for a [1024, 576] residual against 0.35 ms for this (measured), and every
    layer takes the signs of three wholes.
    """
    return (y >= 0).to(y.dtype).mul_(2).sub_(1)


def _prox_(z: Tensor, sign_y: Tensor, abs_y: Tensor) -> Tensor:
    """Σ_d (|y_d| − |y_d − z_d|) over the last dim; overwrites ``z`` (no extra full-size buffer).

    ``sign_y``/``abs_y`` broadcast against ``z``.
    """
    a = z.mul_(sign_y)
    linear = a.sum(-1)
    overshoot = a.sub_(abs_y).clamp_min_(0).sum(-1)
    return (linear - 2 * overshoot).clamp_min_(0)


def proximity(whole: Tensor, parts: Tensor, *, scratch: bool = False) -> Tensor:
    """Proximity of each part to the whole: ``whole`` [..., D], ``parts`` [..., K, D] → [..., K].

    The elementwise form ``Σ_d (|y_d| − |y_d − z_d|)``, clamped at 0. ``scratch``: ``parts`` is
    the caller's own (e.g. just stacked) and may be overwritten, rather than copied first.
    """
    acc = accumulation_dtype(whole, parts)
    y = whole.to(acc).unsqueeze(-2)  # [..., 1, D]
    z = parts.to(acc) if scratch else parts.to(acc, copy=True)
    return _prox_(z, signs(y), y.abs())


def normalize(prox: Tensor, dim: int = -1) -> Tensor:
    """Divide by the sum over ``dim`` (a whole with no positive part gets all zeros)."""
    return prox / divisor(prox.sum(dim, keepdim=True))


def divisor(total: Tensor) -> Tensor:
    """What proximities summing to ``total`` are divided by: the total, or +inf where it is not
    positive, so that a whole with no positive part gets zeros (its parts are all 0).

    The choice is made on the totals, not on every part: ``torch.where`` over a layer's [T, T]
    shares cost more on a CPU than the division itself.
    """
    return torch.where(total > 0, total, torch.inf)


@cache
def triton_installed() -> bool:
    """Whether triton can be imported (the ``gpu`` extra); checked without importing it."""
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton is installed and compiles for ``device``: a CUDA GPU of compute capability 7.0 or
    newer (older ones are below Triton's minimum; CUDA torch wheels bring triton along)."""
    return (
        device.type == "cuda"
        and triton_installed()
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (7, 0)
    )


# Why the Triton kernels did not compile here, once they have not (then "auto" stops trying).
_TRITON_FAILED: list[KernelError] = []


def kernel_for(device: torch.device, accumulation: torch.dtype = torch.float32) -> str:
    """The proximity kernel "auto" picks: for float32 work ``numba`` (the fused CPU kernel) on a
    CPU and ``triton`` (:mod:`llm_flow.engine.gpu_kernels`) where :func:`triton_runs_on` and
    no Triton kernel has failed to compile in this process; ``torch`` (the tiled reference)
    otherwise, float64 always."""
    if accumulation != torch.float32:
        return "torch"
    if device.type == "cpu":
        return "numba"
    return "triton" if triton_runs_on(device) and not _TRITON_FAILED else "torch"


def _on_triton(run: Callable[[], Tensor], *, asked: bool) -> Tensor | None:
    """``run()`` (a Triton kernel); when the kernel does not compile on this GPU, the error if
    the caller ``asked`` for Triton, else None after a warning: "auto" then takes the torch
    path, here and for the rest of the process (slower, the same numbers)."""
    try:
        return run()
    except KernelError as exc:
        if asked:
            raise
        _TRITON_FAILED.append(exc)
        logging.getLogger(__name__).warning("%s; contributions use the torch path instead", exc)
        return None


def default_memory_budget(device: torch.device) -> int:
    """Bytes of part vectors alive at once. On CPUs small tiles stay in cache (16 MB measured
    ~3.5× faster than 256 MB at 256 tokens); GPUs want large tiles to fill the device."""
    return 512 * 2**20 if device.type == "cuda" else 16 * 2**20


def causal_tiles(
    n_q: int, n_s: int, bytes_per_part: int, budget: int
) -> Iterator[tuple[int, int, int, int]]:
    """(q0, q1, s0, s1) tiles covering every causal (query t, source s ≤ t) pair exactly once,
    each holding at most ``budget`` bytes of part vectors (a single part may exceed it)."""
    q_tile = max(1, min(QUERY_TILE, n_q, budget // max(1, bytes_per_part)))
    s_tile = max(1, budget // max(1, q_tile * bytes_per_part))
    for q0 in range(0, n_q, q_tile):
        q1 = min(n_q, q0 + q_tile)
        n_src = min(n_s, q1)  # causal: sources after the tile's last query contribute nothing
        for s0 in range(0, n_src, s_tile):
            yield q0, q1, s0, min(n_src, s0 + s_tile)


def attention_proximity(
    whole: Tensor,
    pattern: Tensor,
    head_outputs: Tensor,
    scale: Tensor,
    *,
    head_factors: tuple[Tensor, Tensor] | None = None,
    memory_budget: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Proximity of every token-level attention part (heads summed) to the whole.

    whole [T, D] (the residual after the block), pattern [H, T, S], head_outputs [S, H, D],
    scale [T] (post-norm 1/rms, ones otherwise) → prox [T, S]. Row t is zero for s > t.
    ``backend``: "auto" picks :func:`kernel_for`'s kernel: the CPU kernel
    (:mod:`llm_flow.engine.token_kernel`, "kernel") or the Triton kernel ("triton", CUDA; on CPU
    tensors only in Triton's interpreter) for float32 work, the tiled torch version otherwise.
    The kernels accumulate in float32 and allocate no parts (``memory_budget`` is the torch path's).
    ``head_factors``: (values [S, H, d_head], W_O [H, d_head, D]) whose per-head products are
    ``head_outputs``; the CPU kernel then computes its linear sums d_head- rather than D-long.
    """
    acc = accumulation_dtype(whole, head_outputs)
    if backend == "triton" or (backend == "auto" and kernel_for(whole.device, acc) == "triton"):
        from llm_flow.engine.gpu_kernels import attention_proximity_triton

        prox = _on_triton(
            lambda: attention_proximity_triton(whole, pattern, head_outputs, scale),
            asked=backend == "triton",
        )
        if prox is not None:
            return prox
    if backend == "kernel" or (backend == "auto" and kernel_for(whole.device, acc) == "numba"):
        from llm_flow.engine.token_kernel import attention_proximity_cpu

        f32 = torch.float32
        factors = None
        if head_factors is not None:
            values, w_o = (t.to(device=whole.device, dtype=f32) for t in head_factors)
            factors = (values, w_o)
        return attention_proximity_cpu(
            whole.to(f32), pattern.to(f32), head_outputs.to(f32), scale.to(f32), factors
        )
    n_q, d_model = whole.shape
    n_s = pattern.shape[-1]
    y = whole.to(acc)
    y_sign, y_abs = signs(y), y.abs()
    u = head_outputs.to(acc)  # [S, H, D]
    a = pattern.to(acc) * scale.to(acc)[None, :, None]  # [H, T, S]
    out = torch.zeros(n_q, n_s, dtype=acc, device=whole.device)
    budget = memory_budget or default_memory_budget(whole.device)
    bytes_per_part = d_model * torch.finfo(acc).bits // 8
    for q0, q1, s0, s1 in causal_tiles(n_q, n_s, bytes_per_part, budget):
        a_tile = a[:, q0:q1, s0:s1].permute(2, 1, 0)  # (S, q, H)
        z = torch.bmm(a_tile, u[s0:s1])  # (S, q, D): part of source s at query t
        out[q0:q1, s0:s1] = _prox_(z, y_sign[q0:q1], y_abs[q0:q1]).T
    return out


def head_proximity(
    whole: Tensor,
    pattern: Tensor,
    head_outputs: Tensor,
    scale: Tensor,
    rows: Tensor,
    *,
    memory_budget: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Proximity of every per-head part ``z[t, s, h]`` for the query ``rows`` [R] → [R, S, H];
    ``pattern`` [H, R, S] is the attention at those rows (whole [T, D] and scale [T] are
    indexed by ``rows``).

    Per-head parts are 9-32× more numerous than token-level ones, so they are computed on demand
    for the rows a view needs (e.g. the targets of edges on a route, or one layer). ``backend``
    as :func:`attention_proximity`.
    """
    acc = accumulation_dtype(whole, head_outputs)
    if backend == "triton" or (backend == "auto" and kernel_for(whole.device, acc) == "triton"):
        from llm_flow.engine.gpu_kernels import head_proximity_triton

        prox = _on_triton(
            lambda: head_proximity_triton(whole, pattern, head_outputs, scale, rows),
            asked=backend == "triton",
        )
        if prox is not None:
            return prox
    if backend == "kernel" or (backend == "auto" and kernel_for(whole.device, acc) == "numba"):
        from llm_flow.engine.kernels import head_proximity_cpu

        f32 = torch.float32
        return head_proximity_cpu(
            whole.to(f32), pattern.to(f32), head_outputs.to(f32), scale.to(f32), rows.cpu()
        )
    n_heads, _, n_s = pattern.shape
    d_model = whole.shape[-1]
    u = head_outputs.to(acc)  # [S, H, D]
    out = torch.zeros(len(rows), n_s, n_heads, dtype=acc, device=whole.device)
    bytes_per_row = n_s * n_heads * d_model * torch.finfo(acc).bits // 8
    budget = memory_budget or default_memory_budget(whole.device)
    step = max(1, budget // max(1, bytes_per_row))
    for i in range(0, len(rows), step):
        idx = rows[i : i + step]
        y = whole[idx].to(acc)[:, None, None, :]  # (R, 1, 1, D)
        a = pattern[:, i : i + step].to(acc) * scale[idx].to(acc)[None, :, None]  # (H, R, S)
        z = a.permute(1, 2, 0)[..., None] * u[None]  # (R, S, H, D)
        out[i : i + step] = _prox_(z, signs(y), y.abs())
    return out


@dataclass(frozen=True)
class LayerContributions:
    """Normalized contributions of one layer. Every whole's parts sum to 1 (or 0 if degenerate).

    Attention whole (row t): ``attention[t, :]``, ``attn_residual[t]``, ``attn_bias[t]`` and, for
    parallel attention + MLP blocks (one sum into resid_post), ``ffn[t]`` too.
    FFN whole (sequential blocks): ``ffn[t]`` and ``ffn_residual[t]``. For parallel blocks
    ``ffn_residual = 1 − ffn`` (everything that reached resid_post through the attention node).
    """

    attention: Tensor  # [T, T] token-level edge weights c[t, s]
    attn_residual: Tensor  # [T]
    attn_bias: Tensor  # [T]
    ffn: Tensor  # [T]
    ffn_residual: Tensor  # [T]


def layer_contributions(
    *,
    resid_pre: Tensor,
    resid_mid: Tensor | None,
    resid_post: Tensor,
    mlp_update: Tensor,
    pattern: Tensor,
    head_outputs: Tensor,
    attn_scale: Tensor,
    attn_bias: Tensor,
    head_factors: tuple[Tensor, Tensor] | None = None,
    memory_budget: int | None = None,
    backend: Backend = "auto",
) -> LayerContributions:
    """Contributions of one layer; ``resid_mid=None`` means parallel attention + MLP.

    attn_bias [D] (or [T, D] per token) is the (post-norm-folded) output bias; with
    ``attn_scale`` [T] it becomes the per-token bias part ``attn_scale[t] · attn_bias``, its own
    part, never silently dropped. ``head_factors`` as :func:`attention_proximity`.
    """
    attn_whole = resid_post if resid_mid is None else resid_mid
    fixed = _fixed_attention_parts(resid_pre, resid_mid, mlp_update, attn_scale, attn_bias)
    attn_prox = attention_proximity(
        attn_whole,
        pattern,
        head_outputs,
        attn_scale,
        head_factors=head_factors,
        memory_budget=memory_budget,
        backend=backend,
    )
    fixed_prox = proximity(attn_whole, fixed, scratch=True)  # [T, K]
    # Both normalized by their common total, without concatenating them (a [T, T + K] copy);
    # attn_prox is this function's own, so it is divided in place.
    by = divisor(attn_prox.sum(1, keepdim=True) + fixed_prox.sum(1, keepdim=True))  # [T, 1]
    attention, fixed_c = attn_prox.div_(by), fixed_prox / by
    residual, bias = fixed_c[:, 0], fixed_c[:, 1]
    if resid_mid is None:
        ffn = fixed_c[:, 2]
        ffn_residual = 1 - ffn
    else:
        ffn_parts = torch.stack([mlp_update, resid_mid], dim=1)  # [T, 2, D]
        ffn_c = normalize(proximity(resid_post, ffn_parts, scratch=True))
        ffn, ffn_residual = ffn_c[:, 0], ffn_c[:, 1]
    f32 = torch.float32
    return LayerContributions(
        attention=attention.to(f32),
        attn_residual=residual.to(f32),
        attn_bias=bias.to(f32),
        ffn=ffn.to(f32),
        ffn_residual=ffn_residual.to(f32),
    )


def _fixed_attention_parts(
    resid_pre: Tensor,
    resid_mid: Tensor | None,
    mlp_update: Tensor,
    attn_scale: Tensor,
    attn_bias: Tensor,
) -> Tensor:
    """The non-token parts of the attention sum → [T, K, D]: the residual, the bias and, for
    parallel blocks (``resid_mid`` None), the FFN update written in the same sum."""
    bias_part = attn_scale.to(attn_bias.dtype)[:, None] * attn_bias  # [T, D]; bias [D] or [T, D]
    fixed = [resid_pre, bias_part] + ([mlp_update] if resid_mid is None else [])
    return torch.stack(fixed, dim=1)


def head_contributions(
    *,
    resid_pre: Tensor,
    resid_mid: Tensor | None,
    resid_post: Tensor,
    mlp_update: Tensor,
    pattern: Tensor,
    head_outputs: Tensor,
    attn_scale: Tensor,
    attn_bias: Tensor,
    rows: Tensor,
    memory_budget: int | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-head contributions for the query ``rows`` [R], LLM-TT's way: every (source, head)
    part normalized together with the residual (and bias) parts. ``pattern`` [H, R, S] is the
    attention at those rows; the other tensors cover every position.

    Returns (heads [R, S, H], residual [R]). Σ_h heads[r, s] is *not* the token-level edge
    weight (proximity is not additive over heads); views must say which one they show.
    """
    attn_whole = resid_post if resid_mid is None else resid_mid
    fixed = _fixed_attention_parts(resid_pre, resid_mid, mlp_update, attn_scale, attn_bias)
    heads = head_proximity(
        attn_whole,
        pattern,
        head_outputs,
        attn_scale,
        rows,
        memory_budget=memory_budget,
        backend=backend,
    )
    n_r, n_s, n_h = heads.shape
    fixed_prox = proximity(attn_whole[rows], fixed[rows])  # [R, K]
    c = normalize(torch.cat([heads.reshape(n_r, n_s * n_h), fixed_prox], dim=1))
    f32 = torch.float32
    return c[:, : n_s * n_h].reshape(n_r, n_s, n_h).to(f32), c[:, n_s * n_h].to(f32)


def neuron_contributions(
    whole: Tensor, base: Tensor, acts: Tensor, W_out: Tensor, b_out: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-neuron contributions at one position to the residual after the FFN.

    whole [D] (resid_post), base [D] (the residual the FFN wrote into), acts [N] post-activation,
    W_out [N, D], b_out [D], scale (post-norm 1/rms, a 0-dim tensor). Parts are
    ``act_n · W_out[n] · scale`` (the activation's sign is kept in the part), the bias and the
    residual, normalized together. Returns (neurons [N], bias, residual).
    """
    acc = accumulation_dtype(whole, W_out)
    parts = acts.to(acc)[:, None] * W_out.to(device=acts.device, dtype=acc) * scale.to(acc)
    extra = torch.stack([b_out.to(acc) * scale.to(acc), base.to(acc)])
    c = normalize(proximity(whole, torch.cat([parts, extra])))
    return c[:-2], c[-2], c[-1]
