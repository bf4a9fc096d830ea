"""Activation × gradient ("attribution patching": Nanda 2023, "Attribution Patching: Activation
Patching At Industrial Scale"; Syed et al. 2023, arXiv 2310.10348) of every head value, dense-FFN
neuron and expert for a target/distractor logit difference: the first-order estimate of the
total effect of zero-ablating each, from one backward pass (see :mod:`llm_flow.analyses.contrast`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llm_flow.engine.trace import Trace
from llm_flow.models.base import ModelRun

if TYPE_CHECKING:
    from llm_flow.analyses.contrast import Contrast


@dataclass(frozen=True)
class Attributions:
    """Activation × gradient of LD for every head value and neuron at every position (CPU)."""

    position: int
    logit_diff: float  # LD of the gradient pass (equals the run's)
    head_values: Tensor  # [L, T, H] ⟨z[t, h], ∂LD/∂z[t, h]⟩, sources summed
    z_grads: Tensor  # [L, T, H, d_head] ∂LD/∂z
    neurons: Tensor  # [L, T, N] act · ∂LD/∂act (dense FFNs; zeros for MoE layers)
    experts: Tensor  # [L, T, E + 1] routed experts, then the shared expert (MoE layers)

    @property
    def ffn(self) -> Tensor:
        """Per FFN block and position, Σ over its neurons or experts → [L, T] (the output bias
        excluded)."""
        return self.neurons.sum(-1) + self.experts.sum(-1)

    def heads(self, run: ModelRun, layer: int, rows: Tensor | None = None) -> Tensor:
        """Per (query t, source s, head h) attribution of ``layer`` at query ``rows`` (None:
        every position) → [R, S, H]; Σ_s is :attr:`head_values`. Attention patterns the run
        dropped are recomputed."""
        rows = torch.arange(run.n_tokens) if rows is None else rows
        lr = run.with_attention({layer: rows}).layers[layer]
        f32 = torch.float32
        return torch.einsum(
            "hts,shk,thk->tsh",
            lr.attention_at(rows).to(f32).cpu(),
            lr.values.to(f32).cpu(),
            self.z_grads[layer][rows.cpu()],
        )


def attribute(trace: Trace, c: Contrast) -> Attributions:
    """One forward + backward pass with hooks on every head's mixed values ``z``, every dense
    FFN's neurons and, in mixture-of-experts layers, the router weights and the FFN update:
    each activation gets a zero-valued leaf added, whose gradient is the gradient with respect
    to the activation (later layers' paths stay connected). A routed expert's attribution is
    ``g_e · ∂LD/∂g_e`` (its router weight: zeroing it removes exactly the expert's part); the
    shared expert's is the block's ``⟨update, ∂LD/∂update⟩`` minus the routed experts'."""
    llm, run = trace.llm, trace.run
    n_layers, info = run.n_layers, llm.info
    moe = set(info.moe_layers)
    leaves: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}

    def add_leaf(name: str) -> Any:
        def hook(tensor: Tensor, hook: Any) -> Tensor:
            leaf = torch.zeros_like(tensor, requires_grad=True)
            leaves[name], values[name] = leaf, tensor.detach()
            return tensor + leaf

        return hook

    z_names = [llm.hook_name("z", layer) for layer in range(n_layers)]
    dense = {
        layer: llm.hook_name("neurons", layer) for layer in range(n_layers) if layer not in moe
    }
    routing = {layer: llm.hook_name("experts", layer) for layer in sorted(moe)}
    blocks = {layer: llm.hook_name("ffn", layer) for layer in sorted(moe)}
    names = [*z_names, *dense.values(), *routing.values(), *blocks.values()]
    logits = llm.logits_with_hooks(run.token_ids, [(n, add_leaf(n)) for n in names], grad=True)
    with torch.inference_mode(False), torch.enable_grad():
        ld = logits[c.position, c.target_id] - logits[c.position, c.distractor_id]
        grads = dict(zip(names, torch.autograd.grad(ld, [leaves[n] for n in names]), strict=True))
    f32 = torch.float32

    def product(name: str) -> Tensor:  # activation × gradient, batch removed → [T, …]
        return (values[name][0].to(f32) * grads[name][0].to(f32)).cpu()

    z = torch.stack([values[n][0].to(f32) for n in z_names]).cpu()  # [L, T, H, dh]
    gz = torch.stack([grads[n][0].to(f32) for n in z_names]).cpu()
    width = max((values[n].shape[-1] for n in dense.values()), default=0)
    neurons = torch.zeros(n_layers, run.n_tokens, width)
    for layer, name in dense.items():
        per_neuron = product(name)
        neurons[layer, :, : per_neuron.shape[1]] = per_neuron
    experts = torch.zeros(n_layers, run.n_tokens, info.n_experts + 1)
    for layer in sorted(moe):
        routed = product(routing[layer])  # [T, E]
        experts[layer, :, :-1] = routed
        experts[layer, :, -1] = product(blocks[layer]).sum(-1) - routed.sum(-1)
    return Attributions(
        position=c.position,
        logit_diff=float(ld.detach()),
        head_values=(z * gz).sum(-1),
        z_grads=gz,
        neurons=neurons,
        experts=experts,
    )
