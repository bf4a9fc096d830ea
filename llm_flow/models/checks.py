"""Decomposition self-checks run on every layer of every run.

The contribution graph is only as right as the decomposition it is built on, so each layer is
checked before anything is computed from it: the residual identities, Σ per-head parts (+ bias) =
the attention update, and Σ per-neuron parts (+ bias) = the FFN update (for a mixture of experts,
Σ expert parts = the FFN update). A failure raises :class:`~llm_flow.errors.SelfCheckError`
naming the layer and the block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm_flow.errors import SelfCheckError
from llm_flow.models.base import LayerRun, at_weights

# Relative tolerance per activation dtype: fp32 must reproduce the whole within 1e-4; half
# precision activations carry their own rounding (the residual additions happen in that dtype).
RTOL: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float64: 1e-6,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}


def relative_error(parts_sum: Tensor, whole: Tensor) -> float:
    """max |Σ parts − whole| / max |whole|, in float64 so the check itself adds no error."""
    whole64 = whole.double()
    scale = whole64.abs().max().clamp_min(1e-12)
    return float((parts_sum.double() - whole64).abs().max() / scale)


def check_layer(layer: LayerRun) -> None:
    """Raise :class:`SelfCheckError` if any identity of ``layer`` fails."""
    rtol = RTOL.get(layer.resid_pre.dtype, 1e-4)
    f32 = torch.float32
    scale_a = layer.attn_scale.to(f32)[:, None]
    scale_m = layer.mlp_scale.to(f32)[:, None]
    checks: list[tuple[str, Tensor, Tensor]] = []
    if layer.pattern is not None:
        # Σ_s Σ_h A[h,t,s] v[s,h] W_O[h]: mix values first so nothing is [T, T, D] here.
        mixed = torch.einsum("hts,shk->thk", layer.pattern.to(f32), layer.values.to(f32))
        heads = at_weights(mixed.flatten(1), layer.W_O.flatten(0, 1), f32)
        checks.append(
            (
                "attention: Σ per-head parts + bias ≠ attention update",
                (heads + layer.b_O.to(f32)) * scale_a,
                layer.attn_update,
            )
        )
    neurons = at_weights(layer.neuron_acts, layer.W_out, f32) + layer.b_out.to(f32)
    if layer.experts is None:
        checks.append(
            ("FFN: Σ per-neuron parts + bias ≠ FFN update", neurons * scale_m, layer.mlp_update)
        )
    else:
        checks.append(
            (
                "FFN: Σ expert parts (routed and shared) ≠ FFN update",
                (neurons + layer.experts.total()) * scale_m,
                layer.mlp_update,
            )
        )
    if layer.resid_mid is None:
        checks.append(
            (
                "parallel block: resid_pre + attention + FFN ≠ resid_post",
                layer.resid_pre.to(f32) + layer.attn_update.to(f32) + layer.mlp_update.to(f32),
                layer.resid_post,
            )
        )
    else:
        checks.append(
            (
                "attention: resid_pre + update ≠ resid_mid",
                layer.resid_pre.to(f32) + layer.attn_update.to(f32),
                layer.resid_mid,
            )
        )
        checks.append(
            (
                "FFN: resid_mid + update ≠ resid_post",
                layer.resid_mid.to(f32) + layer.mlp_update.to(f32),
                layer.resid_post,
            )
        )
    for what, parts_sum, whole in checks:
        err = relative_error(parts_sum, whole)
        if not err <= rtol:  # also catches NaN
            raise SelfCheckError(
                f"self-check failed at layer {layer.index}, {what} "
                f"(relative error {err:.2e} > {rtol:.0e}); the graph would be wrong, so "
                "nothing is shown — please report this model/architecture"
            )
