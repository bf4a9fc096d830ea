"""The weights a layer's decomposition reads off the TransformerBridge: per-head output weights,
the FFN's output weights, biases, and the factors folded into them (a post-norm's gain,
Granite's residual multiplier), so that parts still sum to the update the block wrote.

Weights are views of the model's parameters on the layer's own device (a model split over
devices keeps them there; only a fold makes a copy, on that device). Biases and gains are small
and go to the contribution ``device``, beside the activations they are added to.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from llm_flow.models.dispatch import module_device
from llm_flow.models.experts import unwrapped


def norm_affine(
    module: Any, d_model: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Gain and bias of a LayerNorm/RMSNorm-like module, read off its behaviour (probed where
    the module's weights are, returned on ``device``).

    Probing with x = (+1, −1, +1, …) — mean 0, mean square 1 — gives norm(±x) = ±x·g/√(1+ε) + b,
    whatever the class stores (``w``, ``1 + w`` for Gemma, a bias or not, or no parameters at
    all, as OLMo's LayerNorm).
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even to probe the norm, got {d_model}")
    eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))
    x = torch.ones(d_model, dtype=dtype, device=module_device(module, device))
    x[1::2] = -1
    with torch.no_grad():
        plus, minus = module(x[None].clone())[0], module(-x[None])[0]
    gain = (plus - minus).double() / (2 * x.double()) * math.sqrt(1 + eps)
    bias = (plus + minus).double() / 2
    return gain.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)


def output_folds(
    block: Any,
    d_model: int,
    *,
    post_norm: bool,
    multiplier: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor | None, Tensor | None]:
    """(attention, FFN) factors [D] of a block's outputs, or None where it is 1: a post-norm's
    gain (linear per dimension) times the residual multiplier."""
    if not post_norm:
        if multiplier == 1.0:
            return None, None
        fold = torch.full((d_model,), multiplier, dtype=dtype, device=device)
        return fold, fold
    g_attn, g_mlp = (
        norm_affine(norm, d_model, dtype, device)[0] * multiplier
        for norm in (block.ln1_post, block.ln2_post)
    )
    return g_attn, g_mlp


def layer_weights(
    block: Any,
    n_heads: int,
    d_model: int,
    folds: tuple[Tensor | None, Tensor | None],
    *,
    experts: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """``W_O`` [H, d_head, D], ``b_O`` [D], ``W_out`` [d_mlp, D] and ``b_out`` [D] of a block
    with ``folds`` applied; an MoE block (``experts``) has no dense ``W_out`` (its parts are
    its experts, see :class:`~llm_flow.models.base.ExpertRun`)."""
    g_attn, g_mlp = folds
    W_O = output_weights(block.attn, n_heads)
    zeros = torch.zeros(d_model, dtype=dtype, device=device)
    b_O = zeros if block.attn.b_O is None else block.attn.b_O.detach().to(device)
    if experts:
        W_out, b_out = zeros[:0, None].expand(0, d_model), zeros
    else:
        W_out = block.mlp.W_out.detach()
        b_out = zeros if block.mlp.b_out is None else block.mlp.b_out.detach().to(device)
    if g_attn is not None:
        W_O, b_O = W_O * g_attn.to(W_O), b_O * g_attn.to(b_O)
    if g_mlp is not None:
        W_out, b_out = W_out * g_mlp.to(W_out), b_out * g_mlp.to(b_out)
    return {"W_O": W_O, "b_O": b_O, "W_out": W_out, "b_out": b_out}


def output_weights(attn: Any, n_heads: int) -> Tensor:
    """Per-head output weights [H, d_head, D]. Multi-head latent attention (DeepSeek V2/V3) has
    a value width unlike its query width, which TransformerLens cannot split: read ``o_proj``."""
    from transformer_lens.model_bridge.generalized_components.attention import (
        PerLayerGeometryError,
    )

    try:
        return attn.W_O.detach()
    except PerLayerGeometryError:
        weight = unwrapped(attn.o).weight.detach()  # [D, H · d_value]
        return weight.T.unflatten(0, (n_heads, -1))
