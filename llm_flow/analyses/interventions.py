"""Interventions: zero- or mean-ablate heads, neurons, experts, FFN blocks or attention edges.

Ablation replaces an activation during the forward pass and lets everything downstream react
(activation patching / ablation as used for circuits, e.g. Wang et al. 2022, "Interpretability in
the Wild: a Circuit for Indirect Object Identification in GPT-2 small", arXiv 2211.00593, which
mean-ablates heads). The activations replaced, through TransformerLens hooks:

- a **head** (``L.H``): its mixed values ``attn.hook_z[t, h]`` (before ``W_O``). Zero removes the
  head's output at t exactly (the attention update changes by ``−z[t, h] @ W_O[h]``, times the
  post-norm scale for pre-norm models; post-norm models renormalize the new sum);
- a **neuron** (``L.N``): ``mlp.hook_post[t, n]``; an **FFN block**: all its neurons at t (the
  output bias stays); a mixture-of-experts FFN block: its whole update at t;
- a routed **expert** (``L.E``) of a mixture-of-experts layer: its router weight at t becomes 0,
  which removes exactly its part ``g_e(t) · E_e(x_t)``; the other experts keep their weights
  (nothing is renormalized or re-routed). Mean ablation then adds the expert's mean part;
- an **attention edge** (``L:S>T`` for all heads, ``L.H:S>T`` for one): the pattern entry
  ``A[h, T, S]`` is set to 0 without renormalizing the row, which removes exactly the part
  ``A[h, T, S] · v[S, h] @ W_O[h]`` of source S at query T. Edges are always zero-ablated.

Mean ablation replaces a head's ``z`` (a neuron's activation, an expert's part) by its mean
over **every position of every prompt** of a reference prompt file (the CLI's default is
``factual.txt`` in the config's ``prompts_dir``), so a position-independent "typical" value
stands in for the specific one. By default an ablation applies at every position; ``position``
restricts it to one.

Running an ablation and reporting before / after is :mod:`llm_flow.analyses.ablation`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from llm_flow.errors import InterventionError, PositionError
from llm_flow.models.base import Hook, LayerRun, ModelInfo, TransparentLlm
from llm_flow.validate import check_position

Mode = Literal["zero", "mean"]
MODES: tuple[Mode, ...] = ("zero", "mean")


@dataclass(frozen=True)
class HeadRef:
    """Attention head ``head`` of ``layer``; at one query ``position`` or (None) at all."""

    layer: int
    head: int
    position: int | None = None

    def __str__(self) -> str:
        at = "" if self.position is None else f"@{self.position}"
        return f"{self.layer}.{self.head}{at}"


@dataclass(frozen=True)
class NeuronRef:
    """FFN neuron ``neuron`` of ``layer``; at one ``position`` or (None) at all."""

    layer: int
    neuron: int
    position: int | None = None

    def __str__(self) -> str:
        at = "" if self.position is None else f"@{self.position}"
        return f"{self.layer}.{self.neuron}{at}"


@dataclass(frozen=True)
class ExpertRef:
    """Routed expert ``expert`` of the mixture-of-experts FFN of ``layer``; at one ``position``
    or (None) at all."""

    layer: int
    expert: int
    position: int | None = None

    def __str__(self) -> str:
        at = "" if self.position is None else f"@{self.position}"
        return f"{self.layer}.{self.expert}{at}"


@dataclass(frozen=True)
class FfnRef:
    """Every neuron of the FFN block of ``layer``; at one ``position`` or (None) at all."""

    layer: int
    position: int | None = None

    def __str__(self) -> str:
        at = "" if self.position is None else f"@{self.position}"
        return f"{self.layer}{at}"


@dataclass(frozen=True)
class EdgeRef:
    """The attention edge from token ``source`` to token ``target`` in ``layer``; one head or
    (None) all heads."""

    layer: int
    source: int
    target: int
    head: int | None = None

    def __str__(self) -> str:
        head = "" if self.head is None else f".{self.head}"
        return f"{self.layer}{head}:{self.source}>{self.target}"


@dataclass(frozen=True)
class Ablation:
    """What to ablate and how (``zero`` or ``mean``; edges are always zeroed)."""

    heads: tuple[HeadRef, ...] = ()
    neurons: tuple[NeuronRef, ...] = ()
    ffn: tuple[FfnRef, ...] = ()
    edges: tuple[EdgeRef, ...] = ()
    mode: Mode = "zero"
    experts: tuple[ExpertRef, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InterventionError(f"unknown ablation mode {self.mode!r}; valid: zero, mean")

    @property
    def is_empty(self) -> bool:
        return not (self.heads or self.neurons or self.ffn or self.edges or self.experts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "heads": [str(h) for h in self.heads],
            "neurons": [str(n) for n in self.neurons],
            "ffn": [str(f) for f in self.ffn],
            "edges": [str(e) for e in self.edges],
            "experts": [str(e) for e in self.experts],
        }


# -- parsing and validation -------------------------------------------------------------------

_PAIR = re.compile(r"(\d+)\.(\d+)")
_EDGE = re.compile(r"(\d+)(?:\.(\d+))?:(-?\d+)>(-?\d+)")


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _pairs(text: str, unit: str, example: str) -> list[tuple[int, int]]:
    """``"3.1,12.0"`` → [(3, 1), (12, 0)]; a bad item names the ``LAYER.UNIT`` form."""
    pairs = []
    for item in _items(text):
        match = _PAIR.fullmatch(item)
        if match is None:
            raise InterventionError(
                f"bad {unit} {item!r}; write {unit}s as LAYER.{unit.upper()}, e.g. {example}"
            )
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


def parse_heads(text: str) -> tuple[HeadRef, ...]:
    """``"3.1,12.0"`` → heads (layer.head)."""
    return tuple(HeadRef(layer, head) for layer, head in _pairs(text, "head", "9.3,10.7"))


def parse_neurons(text: str) -> tuple[NeuronRef, ...]:
    """``"5.120,7.3"`` → neurons (layer.neuron)."""
    return tuple(NeuronRef(layer, n) for layer, n in _pairs(text, "neuron", "5.120,7.3"))


def parse_experts(text: str) -> tuple[ExpertRef, ...]:
    """``"3.1,5.7"`` → routed experts (layer.expert)."""
    return tuple(ExpertRef(layer, e) for layer, e in _pairs(text, "expert", "3.1,5.7"))


def parse_edges(text: str) -> tuple[EdgeRef, ...]:
    """``"3:1>4,3.2:0>5"`` → edges LAYER:SOURCE>TARGET (all heads) or LAYER.HEAD:SOURCE>TARGET."""
    refs = []
    for item in _items(text):
        match = _EDGE.fullmatch(item)
        if match is None:
            raise InterventionError(
                f"bad edge {item!r}; write edges as LAYER:SOURCE>TARGET (all heads) or "
                "LAYER.HEAD:SOURCE>TARGET, token positions counted from 0, e.g. 3:1>4"
            )
        layer, head, source, target = match.groups()
        refs.append(
            EdgeRef(int(layer), int(source), int(target), None if head is None else int(head))
        )
    return tuple(refs)


def _ranges(info: ModelInfo) -> str:
    units = f"heads 0..{info.n_heads - 1} and neurons 0..{info.d_mlp - 1} per layer"
    if info.moe_layers:
        units = (
            f"heads 0..{info.n_heads - 1} per layer, experts 0..{info.n_experts - 1} in the "
            f"mixture-of-experts layers {_layer_list(info.moe_layers)}"
        )
    return f"this model has layers 0..{info.n_layers - 1}, {units}"


def _layer_list(layers: Sequence[int]) -> str:
    return ", ".join(str(layer) for layer in layers)


def _check(what: str, value: int, size: int, item: object, info: ModelInfo) -> None:
    if not 0 <= value < size:
        raise InterventionError(f"{what} {value} in {str(item)!r} is out of range; {_ranges(info)}")


def _position(value: int, n_tokens: int, item: object) -> int:
    try:
        return check_position(value, n_tokens)
    except PositionError as exc:
        raise InterventionError(f"in {str(item)!r}: {exc}") from None


def validate(ablation: Ablation, info: ModelInfo, n_tokens: int) -> Ablation:
    """Check every id against the model's shape and the prompt's length; returns the ablation
    with negative positions normalized. Errors name the valid ranges."""
    layers = info.n_layers
    heads, neurons, ffn, edges = [], [], [], []
    for h in ablation.heads:
        _check("layer", h.layer, layers, h, info)
        _check("head", h.head, info.n_heads, h, info)
        pos = None if h.position is None else _position(h.position, n_tokens, h)
        heads.append(HeadRef(h.layer, h.head, pos))
    for n in ablation.neurons:
        _check("layer", n.layer, layers, n, info)
        if n.layer in info.moe_layers:
            raise InterventionError(
                f"layer {n.layer} in {str(n)!r} is a mixture of experts, which has no dense "
                "neurons; ablate its experts (LAYER.EXPERT) or the whole FFN block"
            )
        _check("neuron", n.neuron, info.d_mlp, n, info)
        pos = None if n.position is None else _position(n.position, n_tokens, n)
        neurons.append(NeuronRef(n.layer, n.neuron, pos))
    for f in ablation.ffn:
        _check("layer", f.layer, layers, f, info)
        pos = None if f.position is None else _position(f.position, n_tokens, f)
        ffn.append(FfnRef(f.layer, pos))
    experts = []
    for x in ablation.experts:
        _check("layer", x.layer, layers, x, info)
        if x.layer not in info.moe_layers:
            where = _layer_list(info.moe_layers) if info.moe_layers else "none: the model is dense"
            raise InterventionError(
                f"layer {x.layer} in {str(x)!r} has a dense FFN, not experts; "
                f"mixture-of-experts layers: {where}"
            )
        _check("expert", x.expert, info.n_experts, x, info)
        pos = None if x.position is None else _position(x.position, n_tokens, x)
        experts.append(ExpertRef(x.layer, x.expert, pos))
    for e in ablation.edges:
        _check("layer", e.layer, layers, e, info)
        if e.head is not None:
            _check("head", e.head, info.n_heads, e, info)
        source, target = _position(e.source, n_tokens, e), _position(e.target, n_tokens, e)
        if source > target:
            raise InterventionError(
                f"edge {str(e)!r} goes from a later token to an earlier one; attention is causal, "
                "so SOURCE must be ≤ TARGET"
            )
        edges.append(EdgeRef(e.layer, source, target, e.head))
    return Ablation(
        tuple(heads), tuple(neurons), tuple(ffn), tuple(edges), ablation.mode, tuple(experts)
    )


# -- mean activations -------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanActivations:
    """Per-layer means over every position of every reference prompt."""

    z: Tensor  # [L, H, d_head] mean attn.hook_z per head
    post: Tensor  # [L, N] mean neuron activation of dense FFNs (zero rows for MoE layers)
    n_prompts: int
    n_positions: int
    source: str = ""
    ffn: Tensor | None = None  # [L, D] mean FFN update (for ablating a whole MoE block)
    experts: Tensor | None = None  # [L, E, D] mean part of each routed expert (0 where unrouted)


def mean_activations(
    llm: TransparentLlm,
    prompts: Sequence[str | Sequence[int]],
    *,
    source: str = "",
    on_prompt: Callable[[int, int], None] | None = None,
) -> MeanActivations:
    """Mean per-head mixed values ``z``, dense-FFN neurons, FFN updates and routed-expert parts
    over all positions of ``prompts`` (texts, or token-id lists used as they are). One forward
    pass per prompt, reduced layer by layer; ``on_prompt(done, total)``."""
    if not prompts:
        raise InterventionError("mean ablation needs at least one reference prompt")
    info = llm.info
    f64 = torch.float64
    z = torch.zeros(info.n_layers, info.n_heads, info.d_head, dtype=f64)
    post = torch.zeros(info.n_layers, info.d_mlp, dtype=f64)
    ffn = torch.zeros(info.n_layers, info.d_model, dtype=f64)
    experts = torch.zeros(info.n_layers, info.n_experts, info.d_model, dtype=f64)
    n_positions = 0

    def add(layer: LayerRun) -> None:
        assert layer.pattern is not None  # on_layer sees every layer's pattern
        mixed = torch.einsum("hts,shk->thk", layer.pattern.to(f64), layer.values.to(f64))
        z[layer.index] += mixed.sum(0).cpu()
        if layer.neuron_acts.shape[1]:
            post[layer.index, : layer.neuron_acts.shape[1]] += (
                layer.neuron_acts.sum(0).cpu().to(f64)
            )
        ffn[layer.index] += layer.mlp_update.sum(0).cpu().to(f64)
        if layer.experts is not None:
            parts = layer.experts.slot_outputs(f64) * layer.mlp_scale.to(f64)[:, None, None]
            index = layer.experts.index.flatten().cpu()
            experts[layer.index].index_add_(0, index, parts.flatten(0, 1).cpu())

    for i, prompt in enumerate(prompts):
        run = llm.run(prompt, on_layer=add, keep_patterns=False)
        n_positions += run.n_tokens
        if on_prompt is not None:
            on_prompt(i + 1, len(prompts))
    f32 = torch.float32
    return MeanActivations(
        z=z.div(n_positions).to(f32),
        post=post.div(n_positions).to(f32),
        n_prompts=len(prompts),
        n_positions=n_positions,
        source=source,
        ffn=ffn.div(n_positions).to(f32),
        experts=experts.div(n_positions).to(f32),
    )


# -- hooks and re-runs ------------------------------------------------------------------------


def mask_hooks(
    llm: TransparentLlm,
    heads: dict[int, Tensor],
    neurons: dict[int, Tensor],
    mode: Mode = "zero",
    means: MeanActivations | None = None,
    *,
    experts: dict[int, Tensor] | None = None,
    blocks: dict[int, Tensor] | None = None,
) -> list[Hook]:
    """Hooks that replace, per layer, the ``attn.hook_z`` entries where ``heads[l]`` [T, H] is
    True and the dense-FFN neurons where ``neurons[l]`` [T, N] is True, by zero or by ``means``.
    For mixture-of-experts layers, ``experts[l]`` [T, E] removes a routed expert's part at t
    (its router weight becomes 0, the other experts' weights stay; mean mode then adds the
    expert's mean part) and ``blocks[l]`` [T] replaces the whole FFN update at t. The dense-mask
    form of :func:`ablation_hooks`, for ablating many components."""
    experts, blocks = experts or {}, blocks or {}
    if mode == "mean" and means is None and (heads or neurons or experts or blocks):
        raise InterventionError("mean ablation needs mean activations (a reference prompt file)")

    def replace(mask: Tensor, mean: Tensor | None) -> Callable[..., Tensor]:
        def hook(tensor: Tensor, hook: Any) -> Tensor:
            out = tensor.clone()
            m = mask.to(tensor.device)
            out[0][m] = 0 if mean is None else mean.to(tensor).expand_as(out[0])[m]
            return out

        return hook

    def mean_of(which: Tensor | None, layer: int) -> Tensor | None:
        return None if mode == "zero" or which is None else which[layer]

    z_means = None if means is None else means.z
    post_means = None if means is None else means.post
    hooks: list[Hook] = [
        (llm.hook_name("z", layer), replace(mask, mean_of(z_means, layer)))
        for layer, mask in sorted(heads.items())
        if bool(mask.any())
    ]
    hooks += [
        (llm.hook_name("neurons", layer), replace(mask, mean_of(post_means, layer)))
        for layer, mask in sorted(neurons.items())
        if bool(mask.any())
    ]
    hooks += [
        (llm.hook_name("experts", layer), replace(mask, None))
        for layer, mask in sorted(experts.items())
        if bool(mask.any())
    ]
    for layer in sorted(set(experts) | set(blocks)):
        block = blocks[layer] if layer in blocks else experts[layer].new_zeros(len(experts[layer]))
        added = None
        if mode == "mean" and layer in experts and means is not None and means.experts is not None:
            added = experts[layer].float() @ means.experts[layer]  # [T, D]
        ffn_mean = mean_of(None if means is None else means.ffn, layer)
        if bool(block.any()) or added is not None:
            hooks.append((llm.hook_name("ffn", layer), _ffn_hook(block, ffn_mean, added)))
    return hooks


def _ffn_hook(block: Tensor, mean: Tensor | None, added: Tensor | None) -> Callable[..., Tensor]:
    """Replace the FFN update where ``block`` [T] is True (by 0 or ``mean`` [D]) and add
    ``added`` [T, D] elsewhere."""

    def hook(tensor: Tensor, hook: Any) -> Tensor:
        out = tensor.clone()
        m = block.to(tensor.device)
        if added is not None:
            out[0] = out[0] + torch.where(m[:, None], 0.0, added.to(tensor))
        out[0][m] = 0 if mean is None else mean.to(tensor)
        return out

    return hook


def ablation_hooks(
    llm: TransparentLlm, ablation: Ablation, n_tokens: int, means: MeanActivations | None = None
) -> list[Hook]:
    """Forward hooks that apply ``ablation`` (already validated) to a prompt of ``n_tokens``
    tokens: one boolean mask per hooked layer, replaced in one step."""
    info = llm.info
    if ablation.edges and not llm.edits_pattern():
        raise InterventionError(
            f"{info.architecture}'s attention computes its pattern inside a module "
            "TransformerLens cannot edit, so attention edges cannot be ablated in this model; "
            "ablate heads instead"
        )
    heads: dict[int, Tensor] = {}
    neurons: dict[int, Tensor] = {}
    experts: dict[int, Tensor] = {}
    blocks: dict[int, Tensor] = {}
    cuts: dict[int, list[tuple[int | slice, int | slice, int | slice]]] = defaultdict(list)
    for h in ablation.heads:
        mask = heads.setdefault(h.layer, torch.zeros(n_tokens, info.n_heads, dtype=torch.bool))
        rows = slice(None) if h.position is None else h.position
        mask[rows, h.head] = True
        # The head's pattern rows are cut too: the output does not change (z is replaced), but a
        # traced run then sees the head read from no token, and books its new z as bias.
        cuts[h.layer].append((h.head, rows, slice(None)))
    for n in ablation.neurons:
        mask = neurons.setdefault(n.layer, torch.zeros(n_tokens, info.d_mlp, dtype=torch.bool))
        mask[slice(None) if n.position is None else n.position, n.neuron] = True
    for f in ablation.ffn:
        rows = slice(None) if f.position is None else f.position
        if f.layer in info.moe_layers:
            blocks.setdefault(f.layer, torch.zeros(n_tokens, dtype=torch.bool))[rows] = True
        else:
            mask = neurons.setdefault(f.layer, torch.zeros(n_tokens, info.d_mlp, dtype=torch.bool))
            mask[rows] = True
    for x in ablation.experts:
        mask = experts.setdefault(x.layer, torch.zeros(n_tokens, info.n_experts, dtype=torch.bool))
        mask[slice(None) if x.position is None else x.position, x.expert] = True
    for e in ablation.edges:
        cuts[e.layer].append((slice(None) if e.head is None else e.head, e.target, e.source))

    def cut(picks: Sequence[tuple[int | slice, int | slice, int | slice]]) -> Callable[..., Tensor]:
        def hook(tensor: Tensor, hook: Any) -> Tensor:  # [1, H, T, S]
            out = tensor.clone()
            for head, target, source in picks:
                out[0, head, target, source] = 0
            return out

        return hook

    hooks = mask_hooks(llm, heads, neurons, ablation.mode, means, experts=experts, blocks=blocks)
    hooks += [(llm.hook_name("pattern", layer), cut(p)) for layer, p in sorted(cuts.items())]
    return hooks
