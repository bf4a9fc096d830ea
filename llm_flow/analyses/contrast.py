"""Why the target and not the distractor? Contrastive effects of heads, neurons and experts.

The question of OpenAI's Transformer Debugger ("why A instead of B?"), answered on an
information-flow route with two standard estimates of each component's share of the *logit
difference* ``LD = logit[p, A] − logit[p, B]`` at the output position p:

- **Direct effect** (direct logit attribution; Elhage et al. 2021, "A Mathematical Framework for
  Transformer Circuits"; used for the IOI circuit by Wang et al. 2022, arXiv 2211.00593): a part
  ``z`` written into the residual stream *at position p* moves LD by ``norm_lin(z; s_p) · (W_U[:, A]
  − W_U[:, B])``, with the final norm as a linear map whose per-token scale ``s_p`` is frozen to
  the one the model used (:func:`llm_flow.analyses.lens.direct_logits`). The map is linear, so the
  direct effects of the embedding, of every per-head part ``z[p, s, h] = A[h, p, s] · scale[p] ·
  v[s, h] @ W_O[h]``, of the output biases and of every neuron ``act[p, n] · W_out[n]`` sum exactly
  to the final residual's LD; adding the final norm's bias and ``b_U`` gives the model's LD. A part
  written at any other position has **no direct effect** (0): it reaches the output only through
  later attention, which the second estimate sees.
- **Attribution** (activation × gradient, "attribution patching": Nanda 2023, "Attribution
  Patching: Activation Patching At Industrial Scale"; Syed et al. 2023, arXiv 2310.10348): the
  first-order estimate of the *total* effect of zero-ablating an activation, ``a · ∂LD/∂a``,
  from one backward pass with respect to ``attn.hook_z`` (per-head mixed values before W_O) and
  ``mlp.hook_post`` (neuron activations). A head's value at query t splits over sources exactly:
  ``attr[t, s, h] = A[h, t, s] · ⟨v[s, h], ∂LD/∂z[t, h]⟩``. Positive means the component pushes
  toward the target; removing it would lower LD by about that much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from llm_flow.analyses.attribution import Attributions, attribute
from llm_flow.engine.nodes import node_id
from llm_flow.engine.routes import Route, route_head_weights
from llm_flow.engine.trace import Trace
from llm_flow.errors import ContrastError
from llm_flow.models.base import LayerRun, ModelRun, TransparentLlm

if TYPE_CHECKING:
    import pandas as pd

RowKind = Literal["head", "neuron", "ffn", "expert", "shared_expert"]
NEURONS_PER_BLOCK = 10
EFFECT_COLUMNS = (
    "kind",
    "layer",
    "head",
    "neuron",
    "expert",
    "source",
    "target",
    "node",
    "weight",
    "direct_effect",
    "attribution",
)


def _pieces(llm: TransparentLlm, ids: list[int]) -> str:
    return "[" + ", ".join(repr(s) for s in llm.token_strings(ids)) + "]"


def single_token(llm: TransparentLlm, text: str, role: str = "token") -> int:
    """The id of ``text`` if it is exactly one token of the model's vocabulary.

    Otherwise :class:`ContrastError` saying how it tokenizes (and suggesting the space-prefixed
    form, which is how most tokenizers spell a word in the middle of a sentence).
    """
    if not text:
        raise ContrastError(f"the {role} is empty; give one token, e.g. ' Mary'")
    ids = llm.encode(text)
    if len(ids) == 1:
        return ids[0]
    hint = ""
    if not text.startswith(" ") and len(llm.encode(" " + text)) == 1:
        hint = f"; {' ' + text!r} (with a leading space) is one token"
    raise ContrastError(
        f"the {role} {text!r} is {len(ids)} tokens for this model {_pieces(llm, ids)}, "
        f"not exactly one{hint}"
    )


@dataclass(frozen=True)
class Contrast:
    """Target vs distractor at one output position, read off a run's logits."""

    target: str
    target_id: int
    distractor: str
    distractor_id: int
    position: int
    target_logit: float
    distractor_logit: float

    @property
    def logit_diff(self) -> float:
        return self.target_logit - self.distractor_logit

    def to_dict(self) -> dict[str, Any]:
        """The CLI's ``"contrast"`` object."""
        return {
            "target": self.target,
            "target_id": self.target_id,
            "distractor": self.distractor,
            "distractor_id": self.distractor_id,
            "target_logit": self.target_logit,
            "distractor_logit": self.distractor_logit,
            "logit_diff": self.logit_diff,
        }


def contrast_ids(llm: TransparentLlm, target: str, distractor: str) -> tuple[int, int]:
    """Ids of the two tokens; each must be one token, and they must differ."""
    a = single_token(llm, target, "target")
    b = single_token(llm, distractor, "distractor")
    if a == b:
        raise ContrastError(
            f"target {target!r} and distractor {distractor!r} are the same token; "
            "give two different tokens"
        )
    return a, b


def contrast(trace: Trace, target: str, distractor: str, position: int = -1) -> Contrast:
    """Logits and logit difference of ``target`` vs ``distractor`` predicted after ``position``."""
    a, b = contrast_ids(trace.llm, target, distractor)
    p = trace.position(position)
    logits = trace.run.logits[p, [a, b]].tolist()
    return Contrast(
        target=target,
        target_id=a,
        distractor=distractor,
        distractor_id=b,
        position=p,
        target_logit=logits[0],
        distractor_logit=logits[1],
    )


def residual_direction(trace: Trace, c: Contrast) -> Tensor:
    """The direction ``e`` [D] (float32) with ``direct effect of z = z · e`` at ``c.position``.

    ``e`` is the transpose of the frozen-scale final norm applied to ``W_U[:, A] − W_U[:, B]``,
    taken as the gradient of that linear map (exact, whatever the norm: RMS or centred LN).
    """
    llm, run = trace.llm, trace.run
    W_U = llm.W_U
    d = (W_U[:, c.target_id] - W_U[:, c.distractor_id]).float()  # [D]
    # Clones: a run's tensors are inference tensors, which autograd may not save.
    scale = run.final_scale[c.position].clone()
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros(d.shape[0], device=d.device, requires_grad=True)
        y = llm.final_norm_linear(x, scale) @ d.clone()
        (e,) = torch.autograd.grad(y, x)
    return e.detach()


@dataclass(frozen=True)
class DirectEffects:
    """Direct effect on LD of every part written at the output position ``position``.

    ``embedding + Σ heads + Σ attn_bias + Σ neurons + Σ mlp_bias = total`` (the final residual
    through the frozen-scale map) and ``total + constant`` is the model's logit difference.
    """

    position: int
    embedding: float
    heads: Tensor  # [L, S, H] part z[p, s, h] of head h from source s
    attn_bias: Tensor  # [L] output bias (times the post-norm scale)
    neurons: Tensor  # [L, N] act[p, n] · W_out[n] (dense FFNs; zeros for MoE layers)
    mlp_bias: Tensor  # [L]
    total: float  # the final residual at p
    constant: float  # final-norm bias + unembedding bias
    experts: Tensor  # [L, E + 1] routed experts' parts at p, then the shared expert's (MoE)

    @property
    def attention(self) -> Tensor:
        """Per layer and source, heads summed (the attention edge into A{l}_p) → [L, S]."""
        return self.heads.sum(-1)

    @property
    def ffn(self) -> Tensor:
        """Per layer, the whole FFN update at p (neurons or experts + bias) → [L]."""
        return self.neurons.sum(-1) + self.experts.sum(-1) + self.mlp_bias

    def parts_sum(self) -> float:
        """Σ of every part's direct effect; equals :attr:`total` up to rounding."""
        return float(
            self.embedding
            + self.heads.sum()
            + self.attn_bias.sum()
            + self.neurons.sum()
            + self.experts.sum()
            + self.mlp_bias.sum()
        )


def direct_effects(trace: Trace, c: Contrast) -> DirectEffects:
    """Direct logit attribution of every head part, neuron and bias at ``c.position``.

    Attention patterns the run dropped are recomputed at ``c.position``. Vectorized: per layer
    two small matrix products (``W_O @ e``, ``W_out @ e``); no [S, H, D] tensor is built.
    """
    llm, p = trace.llm, c.position
    run = trace.run.with_attention({layer: [p] for layer in range(trace.n_layers)})
    e = residual_direction(trace, c)
    f32 = torch.float32
    heads, attn_bias, neurons, mlp_bias, experts = [], [], [], [], []
    width = max(layer.neuron_acts.shape[1] for layer in run.layers)
    n_experts = llm.info.n_experts
    for layer in run.layers:
        e_l = e.to(layer.values.device)
        head_dir = _weights_times(layer.W_O, e_l)  # [H, d_head]
        per_source = torch.einsum("shk,hk->sh", layer.values.to(f32), head_dir)  # [S, H]
        a_scale = layer.attn_scale[p].to(f32)
        pattern = layer.attention_at(torch.tensor([p]))[:, 0]  # [H, S]
        heads.append(pattern.to(f32).T * a_scale * per_source)  # [S, H]
        attn_bias.append(a_scale * (layer.token_b_O[p].to(f32) @ e_l))
        m_scale = layer.mlp_scale[p].to(f32)
        per_neuron = layer.neuron_acts[p].to(f32) * m_scale * _weights_times(layer.W_out, e_l)
        neurons.append(torch.nn.functional.pad(per_neuron, (0, width - per_neuron.shape[0])))
        b_out = layer.b_out.expand_as(layer.resid_pre)[p]  # [D] even in an intervened MoE run
        mlp_bias.append(m_scale * (b_out.to(f32) @ e_l))
        experts.append(_expert_effects(layer, p, e_l, n_experts) * m_scale)
    first, last = run.layers[0], run.layers[-1]
    embedding = float(first.resid_pre[p].to(f32) @ e.to(first.resid_pre.device))
    total = float(last.resid_post[p].to(f32) @ e.to(last.resid_post.device))
    zero = llm.final_norm(torch.zeros(1, e.shape[0])).float()[0]  # the final norm's bias
    d = (llm.W_U[:, c.target_id] - llm.W_U[:, c.distractor_id]).float()
    b_U = llm.b_U.float()
    constant = float(zero.to(d.device) @ d + b_U[c.target_id] - b_U[c.distractor_id])
    return DirectEffects(
        position=p,
        embedding=embedding,
        heads=torch.stack(heads).cpu(),
        attn_bias=torch.stack(attn_bias).cpu(),
        neurons=torch.stack(neurons).cpu(),
        mlp_bias=torch.stack(mlp_bias).cpu(),
        total=total,
        constant=constant,
        experts=torch.stack(experts).cpu(),
    )


def _weights_times(w: Tensor, e: Tensor) -> Tensor:
    """``w @ e`` in float32, computed where the weights are (a layer of a model split over devices
    keeps them on its device) and returned where ``e`` is."""
    return (w.float() @ e.to(w.device)).to(e.device)


def _expert_effects(layer: LayerRun, p: int, e: Tensor, n_experts: int) -> Tensor:
    """Direct effect of each routed expert's part at ``p`` and of the shared expert's (last
    entry), before the post-norm scale → [E + 1]; zeros for a dense FFN."""
    out = torch.zeros(n_experts + 1, device=e.device)
    ex = layer.experts
    if ex is None:
        return out
    at = torch.tensor([p], device=ex.index.device)
    slots = ex.slot_outputs(rows=at)[0] @ e  # [k]
    out.index_add_(0, ex.index[p].to(e.device), slots)
    shared = ex.shared_output(rows=at)
    if shared is not None:
        out[-1] = shared[0] @ e
    return out


@dataclass(frozen=True)
class EffectRow:
    """One component on the route: a head's part on one attention edge, a neuron, a routed or
    shared expert, or an FFN block.

    ``source``/``target`` are token positions (the same for neurons and FFN blocks). ``weight``
    is the per-head contribution (LLM-TT normalization) for heads, the route's FFN edge weight for
    FFN blocks and None for neurons. ``direct_effect`` is 0 unless ``target`` is the output
    position; ``attribution`` is act × grad (for FFN blocks: summed over neurons).
    """

    kind: RowKind
    layer: int
    head: int | None
    neuron: int | None
    source: int
    target: int
    weight: float | None
    direct_effect: float
    attribution: float
    expert: int | None = None

    @property
    def node(self) -> str:
        """The graph node the row belongs to: ``A{l}_t`` for heads, ``M{l}_t`` otherwise."""
        return node_id("A" if self.kind == "head" else "M", self.layer, self.target)


def effect_rows(
    trace: Trace,
    route: Route,
    direct: DirectEffects,
    attributions: Attributions,
    *,
    neurons_per_block: int = NEURONS_PER_BLOCK,
) -> tuple[EffectRow, ...]:
    """Rows for every head on every attention edge of ``route``, every FFN block on it and, per
    FFN block, the ``neurons_per_block`` neurons with the largest ``max(|direct|, |attr|)`` (for
    a mixture of experts: the experts routed to at that token and the shared expert)."""
    p = direct.position
    rows: list[EffectRow] = []
    idx, _ = route.attention_edges()  # [E, 3] (layer, t, s)
    on_route = idx[:, 0].unique().tolist()
    run = trace.run.with_attention({layer: idx[idx[:, 0] == layer, 1] for layer in on_route})
    edges, head_weights = route_head_weights(run, route)  # [E, 3] (layer, t, s), [E, H]
    for layer in on_route:
        at_layer = edges[:, 0] == layer
        sel, weights = edges[at_layer], head_weights[at_layer]  # [E_l, 3], [E_l, H]
        targets, sources = sel[:, 1], sel[:, 2]
        per_source = attributions.heads(run, layer, targets)  # [E_l, S, H]
        attr = per_source[torch.arange(len(sel)), sources]  # [E_l, H]
        de = torch.where((targets == p)[:, None], direct.heads[layer, sources], 0.0)
        table = torch.stack([weights, de, attr], dim=-1).tolist()  # [E_l, H, 3]
        for (t, s), per_head in zip(sel[:, 1:].tolist(), table, strict=True):
            rows += [
                EffectRow("head", layer, h, None, s, t, w, d, a)
                for h, (w, d, a) in enumerate(per_head)
            ]
    ffn_idx = route.ffn.nonzero()  # [F, 2] (layer, t)
    if len(ffn_idx):
        ls, ts = ffn_idx[:, 0], ffn_idx[:, 1]
        at_p = ts == p
        block_de = torch.where(at_p, direct.ffn[ls], 0.0)
        block_attr = attributions.ffn[ls, ts]
        block_w = route.ffn_weights[ls, ts]
        for (layer, t), w, d, a in zip(
            ffn_idx.tolist(), block_w.tolist(), block_de.tolist(), block_attr.tolist(), strict=True
        ):
            rows.append(EffectRow("ffn", layer, None, None, t, t, w, d, a))
        if neurons_per_block > 0:
            n_attr = attributions.neurons[ls, ts]  # [F, N]
            n_de = torch.where(at_p[:, None], direct.neurons[ls], 0.0)  # [F, N]
            k = min(neurons_per_block, n_attr.shape[1])
            top = torch.maximum(n_attr.abs(), n_de.abs()).topk(k, dim=-1).indices  # [F, k]
            picked = torch.stack([top, n_de.gather(1, top), n_attr.gather(1, top)], dim=-1)
            for (layer, t), block in zip(ffn_idx.tolist(), picked.tolist(), strict=True):
                rows += [
                    EffectRow("neuron", layer, None, int(n), t, t, None, d, a)
                    for n, d, a in block
                    if run.layers[layer].experts is None
                ]
        rows += _expert_rows(run, ffn_idx.tolist(), direct, attributions)
    return tuple(rows)


def _expert_rows(
    run: ModelRun, blocks: list[list[int]], direct: DirectEffects, attributions: Attributions
) -> list[EffectRow]:
    """Per mixture-of-experts block (layer, t) on the route: its routed experts at t, then its
    shared expert."""
    rows: list[EffectRow] = []
    for layer, t in blocks:
        ex = run.layers[layer].experts
        if ex is None:
            continue
        de = direct.experts[layer] if t == direct.position else torch.zeros_like(direct.experts[0])
        attr = attributions.experts[layer, t]
        for e in sorted(set(ex.index[t].tolist())):
            d, a = float(de[e]), float(attr[e])
            rows.append(EffectRow("expert", layer, None, None, t, t, None, d, a, expert=e))
        if ex.shared_acts is not None:
            d, a = float(de[-1]), float(attr[-1])
            rows.append(EffectRow("shared_expert", layer, None, None, t, t, None, d, a))
    return rows


LARGE_EFFECT_SHARE = 0.1  # |effect| ≥ this share of |logit difference| counts as large


def small_weight_large_effect(
    weight: float | None,
    direct_effect: float,
    attribution: float,
    threshold: float,
    logit_diff: float,
) -> bool:
    """Whether a component is *near* little yet *does* much: its route weight (proximity, the
    share of the residual it makes up) is below τ while its direct effect or attribution is at
    least :data:`LARGE_EFFECT_SHARE` of |logit difference|. Proximity measures size, not
    direction: a small write along the unembedding difference can move the logits a lot (head
    23.3 of SmolLM2: weight 0.003, direct effect +2.87)."""
    if weight is None:  # neurons have no route weight of their own
        return False
    large = LARGE_EFFECT_SHARE * abs(logit_diff)
    return weight < threshold and max(abs(direct_effect), abs(attribution)) >= large


def effects_frame(rows: tuple[EffectRow, ...] | list[EffectRow]) -> pd.DataFrame:
    """A sortable table of rows, columns :data:`EFFECT_COLUMNS` (head/neuron nullable ints)."""
    import pandas as pd

    frame = pd.DataFrame(
        [
            (
                r.kind,
                r.layer,
                r.head,
                r.neuron,
                r.expert,
                r.source,
                r.target,
                r.node,
                r.weight,
                r.direct_effect,
                r.attribution,
            )
            for r in rows
        ],
        columns=list(EFFECT_COLUMNS),
    )
    nullable = {"head": "Int64", "neuron": "Int64", "expert": "Int64", "weight": "float64"}
    return frame.astype(nullable)


@dataclass(frozen=True)
class ContrastAnalysis:
    """Everything the "why A instead of B?" view shows for one run and route."""

    contrast: Contrast
    direct: DirectEffects
    attributions: Attributions
    rows: tuple[EffectRow, ...]

    def frame(self) -> pd.DataFrame:
        return effects_frame(self.rows)


def analyse_contrast(
    trace: Trace,
    route: Route,
    target: str,
    distractor: str,
    *,
    position: int | None = None,
    neurons_per_block: int = NEURONS_PER_BLOCK,
) -> ContrastAnalysis:
    """Contrast, direct effects, attributions and the route's effect table in one call
    (one extra forward + backward pass). ``position`` defaults to the route's (first) output
    position."""
    p = route.positions[0] if position is None else position
    c = contrast(trace, target, distractor, p)
    direct = direct_effects(trace, c)
    attributions = attribute(trace, c)
    rows = effect_rows(trace, route, direct, attributions, neurons_per_block=neurons_per_block)
    return ContrastAnalysis(contrast=c, direct=direct, attributions=attributions, rows=rows)
