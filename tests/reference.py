"""Slow versions of the engine, written from the definitions with explicit loops in float64,
that the engine is checked against (Ferrando & Voita 2024, eq. 3-4: proximity of each part to
the whole, clamped at zero, normalized over the parts)."""

from __future__ import annotations

import torch

from llm_flow.models.base import LayerRun


def layer_kwargs(layer: LayerRun) -> dict[str, torch.Tensor | None]:
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


def layer_kwargs64(layer: LayerRun) -> dict[str, torch.Tensor | None]:
    """The same inputs in float64, head outputs computed in float64 too: the engine then
    accumulates in float64 and only its final cast to float32 rounds."""
    kwargs = {k: None if v is None else v.double() for k, v in layer_kwargs(layer).items()}
    return kwargs | {"head_outputs": layer.head_outputs(torch.float64)}


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
