"""Which SAE latents an attention edge carries: the edge's part split over its source's latents.

The attention edge ``{source}->A{l}_t`` has the part ``z[t, s] = scale[t] · Σ_h A[h, t, s] ·
v_h(x_s) @ W_O,h`` (Ferrando & Voita 2024; :mod:`llm_flow.engine.contributions`), where the value
``v_h(x_s)`` reads the source's residual ``x_s`` through the pre-attention norm. With that norm's
per-token scale at s frozen to the model's (and a latent-attention model's latent norms: see
:mod:`llm_flow.models.qk`), ``v_h`` is affine in ``x_s``, so an SAE on the hook that reads the
source (the one :mod:`llm_flow.analyses.latents` uses for that node) splits the edge too: writing
``x_s = Σ_i c⁻¹ f_i d_i + c⁻¹ b_dec + ε``, each piece's image through the frozen norm and every
head's OV circuit, weighted by ``A[h, t, s]``, is a part, and the map's constant (the norm's bias
and the value bias, through W_O) is the ``bias`` part:

    z[t, s] = Σ_i z_i + z_{b_dec} + z_bias + z_ε.

The attention output bias is not in the edge's part (the engine gives it its own part of
``A{l}_t``), so not here either. Each part gets its proximity to ``z[t, s]`` normalized over all
parts, so the contributions of every active latent, ``b_dec``, ``bias`` and ``ε`` sum to 1. The
parts are assembled in float64 and checked to sum to the engine's ``z[t, s]`` on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llm_flow.analyses.latents import check_hook, decompose
from llm_flow.analyses.lens import residual_vector
from llm_flow.engine import nodes
from llm_flow.engine.contributions import normalize, proximity
from llm_flow.engine.trace import Trace
from llm_flow.errors import SaeError, SelfCheckError
from llm_flow.models.checks import RTOL
from llm_flow.models.sae import Sae
from llm_flow.validate import check_at_least

PARTS_PER_PASS = 64  # residual parts projected at once: bounds the memory of a long prompt


@dataclass(frozen=True)
class EdgeLatent:
    """One latent active at the source: its ``activation`` f_i and its part's ``contribution``
    to the edge's part."""

    index: int
    activation: float
    contribution: float

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "activation": self.activation,
            "contribution": self.contribution,
        }


@dataclass(frozen=True)
class EdgeLatents:
    """An attention edge's part as its source's SAE parts. ``latents`` are the ``top`` active
    latents by contribution; ``l0`` counts every active one and ``latents_contribution`` is all
    of theirs together, so ``latents_contribution + b_dec_contribution + bias_contribution +
    error_contribution`` = 1. ``weight`` is the edge's weight in the graph (its part's share of
    ``A{l}_t``); ``part_norm`` the L1 norm of its part."""

    edge: str
    source: str
    target: str
    hook: str
    weight: float
    part_norm: float
    latents: tuple[EdgeLatent, ...]
    latents_contribution: float
    b_dec_contribution: float
    bias_contribution: float
    error_contribution: float
    l0: int

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``llm-flow latents --edge`` object."""
        return {
            "edge": self.edge,
            "source": self.source,
            "target": self.target,
            "hook": self.hook,
            "weight": self.weight,
            "part_norm": self.part_norm,
            "latents": [latent.to_json() for latent in self.latents],
            "latents_contribution": self.latents_contribution,
            "b_dec_contribution": self.b_dec_contribution,
            "bias_contribution": self.bias_contribution,
            "error_contribution": self.error_contribution,
            "l0": self.l0,
        }


def parse_edge(edge: str, n_layers: int, n_tokens: int) -> tuple[int, int, int]:
    """``(layer, target, source)`` of the attention edge ``edge`` of a run, or :class:`SaeError`
    naming the valid forms."""
    parsed = nodes.parse_attention_edge(edge)
    forms = (
        f"attention edges are X0_s->A0_t or I{{l-1}}_s->A{{l}}_t with s ≤ t, l < {n_layers} "
        f"and t < {n_tokens}, e.g. {nodes.attention_edge_id(min(1, n_layers - 1), 1, 0)}"
    )
    if parsed is None:
        raise SaeError(f"{edge!r} is not an attention edge; {forms}")
    layer, t, _ = parsed
    if layer >= n_layers or t >= n_tokens:
        raise SaeError(f"edge {edge!r} is outside this run; {forms}")
    return parsed


@dataclass(frozen=True)
class EdgeParts:
    """An attention edge's part split over its source's SAE: ``parts`` [n + 3, D] float64 are
    the ``n`` active latents' (indices ``active``, activations ``activations``), then ``b_dec``'s,
    the ``bias`` part and ``ε``'s; they sum to ``whole``, the engine's part of the edge."""

    layer: int
    target: int
    source: int
    hook: str
    active: Tensor  # [n]
    activations: Tensor  # [n]
    parts: Tensor  # [n + 3, D]
    whole: Tensor  # [D]


def edge_parts(trace: Trace, edge: str, sae: Sae) -> EdgeParts:
    """The parts of the attention ``edge`` (``I{l-1}_s->A{l}_t`` or ``X0_s->A0_t``) over the
    SAE on its source (see the module), checked to sum to the engine's part of the edge. One
    forward pass stopped at layer l, and one pass of layer l's attention per 64 parts."""
    run = trace.run
    layer, t, s = parse_edge(edge, run.n_layers, run.n_tokens)
    source = nodes.source_id(layer, s)
    node = nodes.parse_node(source)
    assert node is not None  # source_id names a node
    hook = check_hook(sae, node.kind, node.layer, source)
    x = residual_vector(run, source)  # [D]
    if x.shape[-1] != sae.d_in:
        raise SaeError(f"the SAE reads {sae.d_in}-dimensional states; this model's are {len(x)}")
    active, acts, pieces = decompose(sae, x)  # [n + 2, D]: latents, b_dec, ε
    values = _piece_values(trace, layer, s, pieces)  # [n + 3, H, d_head]: + the constant
    lr = run.with_attention({layer: [t]}).layers[layer]
    weights = lr.attention_at(torch.tensor([t]))[:, 0, s].double() * float(lr.attn_scale[t])
    weights = weights.to(values.device)  # [H]: A[h, t, s] · scale[t]
    W_O = lr.W_O.to(device=values.device, dtype=torch.float64)  # [H, d_head, D]
    parts = torch.einsum("h,nhk,hkd->nd", weights, values, W_O)
    n = len(active)
    parts = parts[[*range(n + 1), n + 2, n + 1]]  # latents, b_dec, bias, ε
    run_values = lr.values[s].to(device=values.device, dtype=torch.float64)  # [H, d_head]
    whole = torch.einsum("h,hk,hkd->d", weights, run_values, W_O)
    _check(edge, parts, whole, lr.resid_pre.dtype)
    return EdgeParts(layer, t, s, hook, active, acts, parts, whole)


def edge_latents(trace: Trace, edge: str, sae: Sae, *, top: int = 20) -> EdgeLatents:
    """The attention ``edge`` as the parts of ``sae`` on its source (:func:`edge_parts`), each
    part's contribution to the edge's part; ``top`` latents listed, by contribution."""
    check_at_least("top", top, 1)
    split = edge_parts(trace, edge, sae)
    contributions = normalize(proximity(split.whole, split.parts))  # [n + 3]
    n = len(split.active)
    ranked = contributions[:n].argsort(descending=True)[:top].tolist()
    table = torch.stack([split.active.double(), split.activations, contributions[:n]], 1).tolist()
    rest = contributions[n:].tolist()
    return EdgeLatents(
        edge=edge,
        source=nodes.source_id(split.layer, split.source),
        target=nodes.node_id("A", split.layer, split.target),
        hook=split.hook,
        weight=float(trace.graph.attention_at(split.layer, split.target, split.source)),
        part_norm=float(split.whole.abs().sum()),
        latents=tuple(
            EdgeLatent(index=int(table[i][0]), activation=table[i][1], contribution=table[i][2])
            for i in ranked
        ),
        latents_contribution=float(contributions[:n].sum()),
        b_dec_contribution=rest[0],
        bias_contribution=rest[1],
        error_contribution=rest[2],
        l0=n,
    )


def _piece_values(trace: Trace, layer: int, s: int, pieces: Tensor) -> Tensor:
    """Each piece's value at source s through layer ``layer``'s frozen-scale map, the map's
    constant removed, then the constant (the value of zeros) → [N + 1, H, d_head] float64."""
    run = trace.run
    project = trace.llm.qk_capture(run.token_ids, layer).project_values
    n_tokens, d_model = run.n_tokens, pieces.shape[-1]
    blank = torch.zeros(1, n_tokens, d_model, dtype=torch.float64, device=pieces.device)
    constant = project(blank)[0, s].double()  # [H, d_head]
    images = []
    for chunk in pieces.split(PARTS_PER_PASS):
        padded = blank.expand(len(chunk), -1, -1).clone()
        padded[:, s] = chunk  # every other position stays zero: values are per position
        images.append(project(padded)[:, s].double().to(constant.device) - constant)
    # On the run's device, with the pieces: a layer of a split model may sit elsewhere.
    return torch.cat([*images, constant[None]]).to(pieces.device)


def _check(edge: str, parts: Tensor, whole: Tensor, dtype: torch.dtype) -> None:
    """Σ parts = the engine's part of ``edge``, within the rounding of the model's dtype on
    parts of their size (they may cancel), or :class:`SelfCheckError`."""
    gap = float((parts.sum(0) - whole).abs().max())
    size = float(parts.abs().sum(0).max())
    if not gap <= RTOL.get(dtype, 1e-4) * max(size, 1e-12):  # also catches NaN
        raise SelfCheckError(
            f"the SAE parts of edge {edge} do not sum to its part (max gap {gap:.3g} on parts "
            f"of size {size:.3g}); nothing is shown — please report this model/architecture"
        )
