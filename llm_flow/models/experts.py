"""Mixture-of-experts FFNs as sums of parts: each routed expert, the shared expert, nothing else.

An MoE layer's FFN update is ``Σ_{e ∈ top-k(t)} g_e(t) · E_e(x_t)`` plus, in some families, a
shared expert ``s(t) · S(x_t)`` (Qwen2-MoE gates it with a sigmoid, DeepSeek adds it as is). Inside
expert e the update is a sum over its neurons, ``g_e(t) · act_n · W_out,e[n]`` (+ its output bias
times ``g_e(t)``).

transformers 5 stores every family's routed experts the same way — one module with 3-D
``gate_up_proj`` / ``up_proj`` and ``down_proj`` parameters, layout flags (``is_transposed``,
``has_bias``, ``has_gate``) and ``_apply_gate`` (GPT-OSS's clamped SwiGLU) — called as
``experts(x, top_k_index, top_k_weights)``. :class:`MoeBlock` reads the routing the model used
from that call (so group-limited routing, score-correction biases and scaling factors need no
code here) and recomputes each selected expert's neurons from the weights; the self-check then
proves Σ parts = the FFN update on every run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from llm_flow.errors import UnsupportedModelError

# UnsupportedModelError messages here are noun phrases ("experts … that …"): BridgeLlm words
# them as "ARCH is not supported: it has …".
from llm_flow.models.base import ExpertRun

# A hook on the experts' routing: fn(weights [T, E] dense router weights) → new weights or None.
RoutingHook = Callable[[Tensor], Tensor | None]


def _is_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    has_in = any(name in params for name in ("gate_up_proj", "up_proj"))
    return has_in and "down_proj" in params and params["down_proj"].ndim == 3


def find_moe(block: nn.Module) -> nn.Module | None:
    """The routed-experts module of an FFN block (the HF module), or None for a dense FFN."""
    experts = unwrapped(getattr(block, "experts", None))
    if isinstance(experts, nn.Module) and _is_experts(experts):
        return experts
    if isinstance(experts, nn.ModuleList):
        raise UnsupportedModelError(
            f"experts kept as a list of modules ({type(block).__name__}; llm-flow reads the "
            "batched 3-D expert weights transformers 5 uses)"
        )
    return None


def _shared_expert(block: nn.Module) -> nn.Module | None:
    for name, child in block.named_children():
        if "shared" in name and _down_projection(unwrapped(child)) is not None:
            return unwrapped(child)
    return None


def unwrapped(module: Any) -> Any:
    """The HF module under any TransformerLens wrappers (their forward calls it)."""
    while isinstance(getattr(module, "original_component", None), nn.Module):
        module = module.original_component
    return module


def _down_projection(module: nn.Module) -> nn.Linear | None:
    for name in ("down_proj", "c_proj", "fc2", "w2"):
        child = unwrapped(getattr(module, name, None))
        if isinstance(child, nn.Linear):
            return child
    return None


class MoeBlock:
    """Hooks on one MoE FFN block's HF modules that capture what its decomposition needs."""

    def __init__(
        self, block: nn.Module, experts: nn.Module, d_model: int, fold: Tensor | None = None
    ) -> None:
        """``fold`` [D]: what the block's output is multiplied by on its way into the residual
        (a post-norm's gain, a residual multiplier), folded into the output weights once here."""
        self.block = block
        hf: Any = experts  # HF's class: 3-D parameters and layout flags
        self.experts = hf
        self.shared = _shared_expert(block)
        self.n_experts = int(hf.down_proj.shape[0])
        self.transposed = self._layout(d_model)
        if len(inspect.signature(hf.forward).parameters) < 3:
            raise UnsupportedModelError(
                f"experts ({type(experts).__name__}) called with tokens already routed and "
                "scaled, not with (tokens, expert indices, router weights), so their routing "
                "cannot be read"
            )
        if getattr(experts, "has_post_expert_norm", False):
            raise UnsupportedModelError(
                f"experts ({type(experts).__name__}) that normalize each expert's output, which "
                "is not a sum of per-neuron parts"
            )
        self.fold = fold
        down, bias = self._down_weights(), self._down_bias()
        # On the experts' device (a model split over devices keeps them there); ExpertRun.to
        # moves a run's activations and biases, never these.
        self.W_out = self._folded(down)  # [E, d_expert, D]
        self.b_out = self._folded(bias)  # [E, D]
        shared_down = None if self.shared is None else _down_projection(self.shared)
        self._shared_down = shared_down
        self._shared_W = (
            None if shared_down is None else self._folded(shared_down.weight.detach().T)
        )
        self._captured: dict[str, Any] = {}

    def _folded(self, x: Tensor) -> Tensor:
        return x if self.fold is None else x * self.fold.to(x)

    def _layout(self, d_model: int) -> bool:
        flag = getattr(self.experts, "is_transposed", None)
        if flag is not None:
            return bool(flag)
        down = self.experts.down_proj  # [E, D, d] or transposed [E, d, D]
        if down.shape[1] == down.shape[2]:
            raise UnsupportedModelError(
                f"experts ({type(self.experts).__name__}) with no declared weight layout and "
                "square weights that do not reveal one"
            )
        return int(down.shape[2]) == d_model

    def _down_weights(self) -> Tensor:
        """Every expert's output weights as [E, d_expert, D] (a view of the parameter)."""
        down = self.experts.down_proj.detach()
        return down if self.transposed else down.transpose(1, 2)

    def _down_bias(self) -> Tensor:
        bias = getattr(self.experts, "down_proj_bias", None)
        down = self.experts.down_proj
        if bias is None or not getattr(self.experts, "has_bias", True):
            d_model = down.shape[2] if self.transposed else down.shape[1]
            return torch.zeros(down.shape[0], d_model, dtype=down.dtype, device=down.device)
        return bias.detach()

    # -- capturing a pass --------------------------------------------------------------------

    def attach(self, routing: RoutingHook | None = None, *, capture: bool = True) -> list[Any]:
        """Register the capture hooks (``capture``) and an optional routing intervention;
        returns the handles."""
        self._captured = {}
        handles = [self.experts.register_forward_pre_hook(self._pre(routing), with_kwargs=True)]
        if not capture:
            return handles
        handles.append(self.block.register_forward_hook(self._block_out))
        if self.shared is not None and self._shared_down is not None:
            handles.append(self._shared_down.register_forward_pre_hook(self._shared_in))
            handles.append(self.shared.register_forward_hook(self._shared_out))
        return handles

    def _pre(self, routing: RoutingHook | None) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x, index, weight = (list(args) + list(kwargs.values()))[:3]
            if routing is not None:
                dense = torch.zeros(*index.shape[:-1], self.n_experts, dtype=weight.dtype)
                dense = dense.to(weight.device).scatter(-1, index.long(), weight)
                new = routing(dense)
                if new is not None:
                    weight = new.to(weight).gather(-1, index.long())
            self._captured |= {"x": x.detach(), "index": index.detach(), "weight": weight.detach()}
            return (x, index, weight), {}

        return hook

    def _block_out(self, module: nn.Module, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self._captured["out"] = out.detach().reshape(-1, out.shape[-1])

    def _shared_in(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._captured["shared_acts"] = args[0].detach().reshape(-1, args[0].shape[-1])

    def _shared_out(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._captured["shared_out"] = output.detach().reshape(-1, output.shape[-1])

    def collect(self) -> ExpertRun:
        """The :class:`ExpertRun` of the pass the hooks just watched (batch of one), on the
        experts' device."""
        got = self._captured
        x, index, weight = got["x"], got["index"], got["weight"]
        acts = self._acts(x, index)
        run = ExpertRun(index, weight, acts, self.W_out, self.b_out, None, None, None)
        down = self._shared_down
        if down is None or self._shared_W is None:
            return run
        # What the block added beyond the routed experts is the shared expert times a per-token
        # gate (sigmoid for Qwen2-MoE, 1 for DeepSeek): read the gate off by least squares (in
        # folded units, the same gate); the self-check proves the fit exact.
        shared = self._folded(got["shared_out"]).double()
        rest = self._folded(got["out"]).double() - run.total(torch.float64)
        gate = (rest * shared).sum(-1) / shared.pow(2).sum(-1).clamp_min(1e-30)
        bias = torch.zeros_like(x) if down.bias is None else down.bias.detach().expand_as(x)
        g = gate.to(x.dtype)[:, None]
        return ExpertRun(
            index,
            weight,
            acts,
            self.W_out,
            self.b_out,
            got["shared_acts"] * g,
            self._shared_W,
            self._folded(bias * g),
        )

    def _acts(self, x: Tensor, index: Tensor) -> Tensor:
        """Each selected expert's neuron activations at its tokens → [T, k, d_expert]."""
        experts: Any = self.experts
        gated = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
        w_in = experts.gate_up_proj if gated else experts.up_proj
        b_in = getattr(experts, "gate_up_proj_bias" if gated else "up_proj_bias", None)
        if not getattr(experts, "has_bias", b_in is not None):
            b_in = None
        d_expert = self.W_out.shape[1]
        apply_gate = getattr(experts, "_apply_gate", None) if gated else None
        acts = torch.zeros(*index.shape, d_expert, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for e in index.unique().tolist():
                t, slot = (index == e).nonzero(as_tuple=True)
                proj = x[t] @ (w_in[e] if self.transposed else w_in[e].T)
                if b_in is not None:
                    proj = proj + b_in[e]
                if gated:
                    acts[t, slot] = apply_gate(proj) if apply_gate else _swiglu(experts, proj)
                else:
                    acts[t, slot] = experts.act_fn(proj)
        return acts


def _swiglu(experts: Any, proj: Tensor) -> Tensor:
    gate, up = proj.chunk(2, dim=-1)
    out: Tensor = experts.act_fn(gate) * up
    return out
