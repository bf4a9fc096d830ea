"""Decomposition self-checks run on every layer of every run.

The contribution graph is only as right as the decomposition it is built on, so each layer is
checked before anything is computed from it: the residual identities, Σ per-head parts (+ bias) =
the attention update, and Σ per-neuron parts (+ bias) = the FFN update (for a mixture of experts,
Σ expert parts = the FFN update). A failure raises :class:`~llm_flow.errors.SelfCheckError`
naming the layer and the block.

The residual identities and the expert sums are checked at every position. The two products
that redo the model's own matrix work (pattern · values · W_O and neurons · W_out) are checked
at every position of a prompt of up to :data:`CHECKED_ROWS` tokens, and at that many positions
spread evenly over a longer one, the first and the last included (:func:`checked_rows`): the
decomposition is one tensor per layer, so a wrong pattern, value layout, weight, bias or norm
fold shows at every position, while checking every row of a long prompt cost more than the
contributions' bookkeeping (1.3 s of a 1024-token SmolLM2 pass on 2 CPU cores, measured; 128
rows 0.16 s, 32 rows ~0.07 s, of which ~0.04 s is the identities at every position).
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
# Query positions at which the attention and neuron sums are redone (see the module docstring).
CHECKED_ROWS = 32


def relative_error(parts_sum: Tensor, whole: Tensor) -> float:
    """max |Σ parts − whole| / max |whole|, the maxima in float32 or better (the difference of
    two floats is exact when they are close, Sterbenz, and off by one rounding of itself
    otherwise, far below any tolerance here), their ratio in float64."""
    acc = torch.promote_types(torch.promote_types(parts_sum.dtype, whole.dtype), torch.float32)
    whole_acc = whole.to(acc)
    error = float((parts_sum.to(acc) - whole_acc).abs().max())
    return error / max(float(whole_acc.abs().max()), 1e-12)


def checked_rows(n_tokens: int, most: int = CHECKED_ROWS) -> Tensor | None:
    """The query positions the products are checked at: None (every one) for up to ``most``
    tokens, else ``most`` positions spread evenly from the first to the last."""
    if n_tokens <= most:
        return None
    return torch.linspace(0, n_tokens - 1, most, dtype=torch.float64).round().long().unique()


def _rows(t: Tensor, rows: Tensor | None) -> Tensor:
    """``t`` [T, …] at ``rows`` (all of it for None)."""
    return t if rows is None else t[rows.to(t.device)]


def check_layer(layer: LayerRun, *, most_rows: int = CHECKED_ROWS) -> None:
    """Raise :class:`SelfCheckError` if any identity of ``layer`` fails (the products at
    :func:`checked_rows` ``(T, most_rows)``)."""
    rtol = RTOL.get(layer.resid_pre.dtype, 1e-4)
    f32 = torch.float32
    rows = checked_rows(layer.resid_pre.shape[0], most_rows)
    checks: list[tuple[str, Tensor, Tensor]] = []
    if layer.pattern is not None:
        pattern = layer.pattern if rows is None else layer.pattern[:, rows.to(layer.pattern.device)]
        # Σ_s Σ_h A[h,t,s] v[s,h] W_O[h]: mix values first so nothing is [T, T, D] here.
        mixed = torch.einsum("hts,shk->thk", pattern.to(f32), layer.values.to(f32))
        heads = at_weights(mixed.flatten(1), layer.W_O.flatten(0, 1), f32)
        checks.append(
            (
                "attention: Σ per-head parts + bias ≠ attention update",
                (heads + _rows(layer.token_b_O, rows).to(f32))
                * _rows(layer.attn_scale, rows).to(f32)[:, None],
                _rows(layer.attn_update, rows),
            )
        )
    if layer.experts is None:
        b_out = layer.b_out.expand_as(layer.mlp_update)
        neurons = at_weights(_rows(layer.neuron_acts, rows), layer.W_out, f32)
        checks.append(
            (
                "FFN: Σ per-neuron parts + bias ≠ FFN update",
                (neurons + _rows(b_out, rows).to(f32))
                * _rows(layer.mlp_scale, rows).to(f32)[:, None],
                _rows(layer.mlp_update, rows),
            )
        )
    else:  # routing differs per token, so every position is checked (the sum is cheap)
        neurons = at_weights(layer.neuron_acts, layer.W_out, f32) + layer.b_out.to(f32)
        checks.append(
            (
                "FFN: Σ expert parts (routed and shared) ≠ FFN update",
                (neurons + layer.experts.total()) * layer.mlp_scale.to(f32)[:, None],
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
