"""Interventions: zero- or mean-ablate heads, neurons, FFN blocks or attention edges and re-run.

Ablation replaces an activation during the forward pass and lets everything downstream react
(activation patching / ablation as used for circuits, e.g. Wang et al. 2022, "Interpretability in
the Wild: a Circuit for Indirect Object Identification in GPT-2 small", arXiv 2211.00593, which
mean-ablates heads). The activations replaced, through TransformerLens hooks:

- a **head** (``L.H``): its mixed values ``attn.hook_z[t, h]`` (before ``W_O``). Zero removes the
  head's output at t exactly (the attention update changes by ``−z[t, h] @ W_O[h]``, times the
  post-norm scale for pre-norm models; post-norm models renormalize the new sum);
- a **neuron** (``L.N``): ``mlp.hook_post[t, n]``; an **FFN block**: all its neurons at t (the
  output bias stays);
- an **attention edge** (``L:S>T`` for all heads, ``L.H:S>T`` for one): the pattern entry
  ``A[h, T, S]`` is set to 0 without renormalizing the row, which removes exactly the part
  ``A[h, T, S] · v[S, h] @ W_O[h]`` of source S at query T. Edges are always zero-ablated.

Mean ablation replaces a head's ``z`` (or a neuron's activation) by its mean over **every
position of every prompt** of a reference prompt file (the CLI's default is ``factual.txt`` in the
config's ``prompts_dir``), so a position-independent "typical" value stands in for the specific
one. By default an ablation applies at every position; ``position`` restricts it to one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from llm_flow.engine.graph import FlowGraph, trace
from llm_flow.errors import LlmFlowError
from llm_flow.models.base import ModelInfo, ModelRun

if TYPE_CHECKING:
    from llm_flow.models.bridge import BridgeLlm

Mode = Literal["zero", "mean"]
MODES: tuple[Mode, ...] = ("zero", "mean")
TOP_K = 5
Hook = tuple[str, Callable[..., Any]]


class InterventionError(LlmFlowError, ValueError):
    """An ablation names a layer, head, neuron, position or edge the model/prompt does not have."""


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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InterventionError(f"unknown ablation mode {self.mode!r}; valid: zero, mean")

    @property
    def is_empty(self) -> bool:
        return not (self.heads or self.neurons or self.ffn or self.edges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "heads": [str(h) for h in self.heads],
            "neurons": [str(n) for n in self.neurons],
            "ffn": [str(f) for f in self.ffn],
            "edges": [str(e) for e in self.edges],
        }


# -- parsing and validation -------------------------------------------------------------------

_PAIR = re.compile(r"(\d+)\.(\d+)")
_EDGE = re.compile(r"(\d+)(?:\.(\d+))?:(-?\d+)>(-?\d+)")


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_heads(text: str) -> tuple[HeadRef, ...]:
    """``"3.1,12.0"`` → heads (layer.head)."""
    refs = []
    for item in _items(text):
        match = _PAIR.fullmatch(item)
        if match is None:
            raise InterventionError(f"bad head {item!r}; write heads as LAYER.HEAD, e.g. 9.3,10.7")
        refs.append(HeadRef(int(match.group(1)), int(match.group(2))))
    return tuple(refs)


def parse_neurons(text: str) -> tuple[NeuronRef, ...]:
    """``"5.120,7.3"`` → neurons (layer.neuron)."""
    refs = []
    for item in _items(text):
        match = _PAIR.fullmatch(item)
        if match is None:
            raise InterventionError(
                f"bad neuron {item!r}; write neurons as LAYER.NEURON, e.g. 5.120,7.3"
            )
        refs.append(NeuronRef(int(match.group(1)), int(match.group(2))))
    return tuple(refs)


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
    return (
        f"this model has layers 0..{info.n_layers - 1}, heads 0..{info.n_heads - 1} and "
        f"neurons 0..{info.d_mlp - 1} per layer"
    )


def _check(what: str, value: int, size: int, item: object, info: ModelInfo) -> None:
    if not 0 <= value < size:
        raise InterventionError(f"{what} {value} in {str(item)!r} is out of range; {_ranges(info)}")


def _position(value: int, n_tokens: int, item: object) -> int:
    if not -n_tokens <= value < n_tokens:
        raise InterventionError(
            f"token position {value} in {str(item)!r} is outside the prompt's {n_tokens} tokens; "
            f"valid: 0..{n_tokens - 1} (or -{n_tokens}..-1 from the end)"
        )
    return value % n_tokens


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
        _check("neuron", n.neuron, info.d_mlp, n, info)
        pos = None if n.position is None else _position(n.position, n_tokens, n)
        neurons.append(NeuronRef(n.layer, n.neuron, pos))
    for f in ablation.ffn:
        _check("layer", f.layer, layers, f, info)
        pos = None if f.position is None else _position(f.position, n_tokens, f)
        ffn.append(FfnRef(f.layer, pos))
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
    return Ablation(tuple(heads), tuple(neurons), tuple(ffn), tuple(edges), ablation.mode)


# -- mean activations -------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanActivations:
    """Per-layer means over every position of every reference prompt."""

    z: Tensor  # [L, H, d_head] mean attn.hook_z per head
    post: Tensor  # [L, N] mean mlp.hook_post per neuron
    n_prompts: int
    n_positions: int
    source: str = ""


def mean_activations(
    llm: BridgeLlm,
    prompts: Sequence[str | Sequence[int]],
    *,
    source: str = "",
    on_prompt: Callable[[int, int], None] | None = None,
) -> MeanActivations:
    """Mean ``attn.hook_z`` and ``mlp.hook_post`` over all positions of ``prompts`` (texts, or
    token-id lists used as they are). One forward pass per prompt; ``on_prompt(done, total)``."""
    if not prompts:
        raise InterventionError("mean ablation needs at least one reference prompt")
    n_layers = llm.info.n_layers
    sums: dict[str, Tensor] = {}
    n_positions = 0

    def add(name: str) -> Callable[..., None]:
        def hook(tensor: Tensor, hook: Any) -> None:
            total = tensor[0].double().sum(0)
            sums[name] = sums[name] + total if name in sums else total

        return hook

    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    post_names = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    hooks = [(n, add(n)) for n in z_names + post_names]
    for i, prompt in enumerate(prompts):
        ids = llm.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        llm.logits_with_hooks(ids, hooks)
        n_positions += len(ids)
        if on_prompt is not None:
            on_prompt(i + 1, len(prompts))
    dtype = torch.float32
    return MeanActivations(
        z=torch.stack([sums[n] for n in z_names]).div(n_positions).to(dtype),
        post=torch.stack([sums[n] for n in post_names]).div(n_positions).to(dtype),
        n_prompts=len(prompts),
        n_positions=n_positions,
        source=source,
    )


# -- hooks and re-runs ------------------------------------------------------------------------


def mask_hooks(
    heads: dict[int, Tensor],
    neurons: dict[int, Tensor],
    mode: Mode = "zero",
    means: MeanActivations | None = None,
) -> list[Hook]:
    """Hooks that replace, per layer, the ``attn.hook_z`` entries where ``heads[l]`` [T, H] is
    True and the ``mlp.hook_post`` entries where ``neurons[l]`` [T, N] is True, by zero or by
    ``means``. The dense-mask form of :func:`ablation_hooks`, for ablating many components."""
    if mode == "mean" and means is None and (heads or neurons):
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
        (f"blocks.{layer}.attn.hook_z", replace(mask, mean_of(z_means, layer)))
        for layer, mask in sorted(heads.items())
        if bool(mask.any())
    ]
    hooks += [
        (f"blocks.{layer}.mlp.hook_post", replace(mask, mean_of(post_means, layer)))
        for layer, mask in sorted(neurons.items())
        if bool(mask.any())
    ]
    return hooks


def ablation_hooks(
    ablation: Ablation, info: ModelInfo, n_tokens: int, means: MeanActivations | None = None
) -> list[Hook]:
    """TransformerLens forward hooks that apply ``ablation`` (already validated) to a prompt of
    ``n_tokens`` tokens: one boolean mask per hooked layer, replaced in one step."""
    heads: dict[int, Tensor] = {}
    neurons: dict[int, Tensor] = {}
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
        mask = neurons.setdefault(f.layer, torch.zeros(n_tokens, info.d_mlp, dtype=torch.bool))
        mask[slice(None) if f.position is None else f.position] = True
    for e in ablation.edges:
        cuts[e.layer].append((slice(None) if e.head is None else e.head, e.target, e.source))

    def cut(picks: Sequence[tuple[int | slice, int | slice, int | slice]]) -> Callable[..., Tensor]:
        def hook(tensor: Tensor, hook: Any) -> Tensor:  # [1, H, T, S]
            out = tensor.clone()
            for head, target, source in picks:
                out[0, head, target, source] = 0
            return out

        return hook

    hooks = mask_hooks(heads, neurons, ablation.mode, means)
    hooks += [(f"blocks.{layer}.attn.hook_pattern", cut(p)) for layer, p in sorted(cuts.items())]
    return hooks


def ablated_logits(
    llm: BridgeLlm,
    token_ids: Sequence[int],
    ablation: Ablation,
    means: MeanActivations | None = None,
) -> Tensor:
    """Logits [T, V] (float32) of one forward pass with ``ablation`` applied (validated here)."""
    checked = validate(ablation, llm.info, len(token_ids))
    hooks = ablation_hooks(checked, llm.info, len(token_ids), means)
    return llm.logits_with_hooks(token_ids, hooks)


def ablated_trace(
    llm: BridgeLlm,
    prompt: str,
    ablation: Ablation,
    means: MeanActivations | None = None,
    *,
    keep_patterns: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> tuple[ModelRun, FlowGraph]:
    """The run and contribution graph of ``prompt`` with ``ablation`` applied (validated here).

    Every self-check holds for the ablated pass: an ablated head reads from no token, and what
    it writes instead (the mean, under mean ablation) is booked as that token's bias, a part no
    node writes; ablated neurons write their replacement value inside their FFN block.
    """
    n_tokens = len(llm.tokenize(prompt))
    hooks = ablation_hooks(validate(ablation, llm.info, n_tokens), llm.info, n_tokens, means)
    return trace(llm, prompt, keep_patterns=keep_patterns, on_layer=on_layer, fwd_hooks=hooks)


# -- before / after ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenProb:
    token: str
    id: int
    prob: float


@dataclass(frozen=True)
class Outcome:
    """The prediction after ``position``: top tokens, and LD / target log-prob when asked for."""

    top: tuple[TokenProb, ...]
    logit_diff: float | None = None
    target_logprob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "top": [{"token": t.token, "id": t.id, "prob": t.prob} for t in self.top],
            "logit_diff": self.logit_diff,
            "target_logprob": self.target_logprob,
        }


def outcome(
    llm: BridgeLlm,
    logits: Tensor,
    *,
    k: int = TOP_K,
    target_id: int | None = None,
    distractor_id: int | None = None,
) -> Outcome:
    """Top-``k`` tokens of one logits row [V], and the target/distractor metrics if given."""
    logprobs = logits.float().log_softmax(-1)
    top = logprobs.topk(min(k, logprobs.numel()))
    ids = top.indices.tolist()
    probs = top.values.exp().tolist()
    tokens = llm.token_strings(ids)
    diff = lp = None
    if target_id is not None:
        lp = float(logprobs[target_id])
        if distractor_id is not None:
            diff = float(logits[target_id] - logits[distractor_id])
    return Outcome(
        top=tuple(TokenProb(t, i, p) for t, i, p in zip(tokens, ids, probs, strict=True)),
        logit_diff=diff,
        target_logprob=lp,
    )


@dataclass(frozen=True)
class AblationResult:
    ablation: Ablation
    position: int
    before: Outcome
    after: Outcome
    means_source: str | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "ablated": self.ablation.to_dict() | {"mean_prompts": self.means_source},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }


def ablate(
    llm: BridgeLlm,
    prompt: str,
    ablation: Ablation,
    *,
    means: MeanActivations | None = None,
    target_id: int | None = None,
    distractor_id: int | None = None,
    position: int = -1,
    k: int = TOP_K,
) -> AblationResult:
    """Run ``prompt`` as is and with ``ablation``; report both predictions after ``position``."""
    ids = llm.tokenize(prompt)
    checked = validate(ablation, llm.info, len(ids))
    before = llm.logits_with_hooks(ids, [])
    after = llm.logits_with_hooks(ids, ablation_hooks(checked, llm.info, len(ids), means))
    return compare(
        llm,
        checked,
        before,
        after,
        means=means,
        target_id=target_id,
        distractor_id=distractor_id,
        position=position,
        k=k,
    )


def compare(
    llm: BridgeLlm,
    ablation: Ablation,
    before: Tensor,
    after: Tensor,
    *,
    means: MeanActivations | None = None,
    target_id: int | None = None,
    distractor_id: int | None = None,
    position: int = -1,
    k: int = TOP_K,
) -> AblationResult:
    """The before/after report of logits [T, V] already computed without and with ``ablation``
    (validated), e.g. the logits of a plain and an :func:`ablated_trace` run."""
    p = _position(position, before.shape[0], f"--position {position}")
    ids_kw = {"target_id": target_id, "distractor_id": distractor_id}
    return AblationResult(
        ablation=ablation,
        position=p,
        before=outcome(llm, before[p], k=k, **ids_kw),
        after=outcome(llm, after[p], k=k, **ids_kw),
        means_source=means.source if means is not None and ablation.mode == "mean" else None,
    )
