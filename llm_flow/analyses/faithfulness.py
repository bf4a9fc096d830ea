"""Is the shown route what the model actually uses? A faithfulness check by ablation.

The circuit-evaluation recipe of Wang et al. 2022 ("Interpretability in the Wild", arXiv
2211.00593, §4: keep the circuit, mean-ablate everything else, compare the logit difference with
the full model's), applied to an information-flow route (Ferrando & Voita 2024).

**Components** are attention heads and FFN blocks, *per token position*: head h of layer l at query
position t (its value ``attn.hook_z[t, h]``, i.e. its whole output written into the residual
stream at t) and the FFN block of layer l at position t (all its neurons ``mlp.hook_post[t]``; a
mixture-of-experts block: its whole update).
Embeddings, residual connections, output biases and norms are never ablated.

A component is **on the route** at threshold τ when
- head (l, h, t): some attention edge of the route into ``A{l}_t`` has a per-head contribution of
  head h of at least τ (per-head parts normalized LLM-TT's way, before any renormalization);
- FFN (l, t): the node ``M{l}_t`` is on the route (its edge weight is at least τ).

Reported, for a metric m (the logit difference target − distractor, or the target's log-prob when
no distractor is given):
- ``route``: m with only the route's components kept (the rest mean-ablated);
- ``complement``: m with the route's components ablated and the rest kept;
- ``route_heads``: m with only the route's heads ablated (FFN blocks kept), and
- ``random_heads``: m with as many random heads ablated (drawn uniformly among all L·T·H head
  positions, one draw per seed; FFN blocks kept): a route that matters hurts far more than
  random heads. (Random FFN blocks are not drawn: mean-ablating almost any FFN block, e.g. layer
  0's, is harmful, so a random FFN baseline says little about the route.)
``share`` is m / m(full model) for the logit difference (the fraction of it that survives, as
Wang et al. report it) and ``(m − m₀) / (m_full − m₀)`` for the log-prob, with m₀ the value with
every component ablated (a log-prob has no natural zero).

``renormalize`` picks the route as the graph view draws it, with or without renormalized weights.
It does not change the scores: τ prunes on the original scale (renormalizing never revives an
edge) and heads are tested on their raw per-head parts, so the components are the same either
way; the report records it so that it names the route it tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from llm_flow.analyses.contrast import contrast_ids, single_token
from llm_flow.analyses.interventions import MeanActivations, Mode, mask_hooks
from llm_flow.engine.routes import DEFAULT_THRESHOLD, Route, find_route, route_head_weights
from llm_flow.engine.trace import Trace
from llm_flow.errors import FaithfulnessError
from llm_flow.models.base import ModelRun, TransparentLlm
from llm_flow.validate import check_at_least, check_threshold

Metric = Literal["logit_diff", "target_logprob"]
DEFAULT_SEEDS = 5


@dataclass(frozen=True)
class Components:
    """A set of components: heads [L, T, H] and FFN blocks [L, T] (boolean masks)."""

    heads: Tensor
    ffn: Tensor

    @property
    def n_heads(self) -> int:
        return int(self.heads.sum())

    @property
    def n_ffn(self) -> int:
        return int(self.ffn.sum())

    def complement(self) -> Components:
        return Components(heads=~self.heads, ffn=~self.ffn)

    def hooks(self, llm: TransparentLlm, mode: Mode, means: MeanActivations | None) -> list[Any]:
        """Hooks that ablate exactly these components."""
        info = llm.info
        heads = {layer: self.heads[layer] for layer in range(self.heads.shape[0])}
        dense = [layer for layer in range(self.ffn.shape[0]) if layer not in info.moe_layers]
        neurons = {layer: self.ffn[layer][:, None].expand(-1, info.d_mlp) for layer in dense}
        blocks = {layer: self.ffn[layer] for layer in info.moe_layers}
        return mask_hooks(llm, heads, neurons, mode, means, blocks=blocks)


def head_mask(run: ModelRun, route: Route, threshold: float) -> Tensor:
    """[L, T, H] True where a route attention edge into A{l}_t has head h's per-head
    contribution ≥ ``threshold``."""
    n_heads = run.layers[0].values.shape[1]
    edges, weights = route_head_weights(run, route)  # [E, 3] (layer, t, s), [E, H]
    hits = torch.zeros(run.n_layers * run.n_tokens, n_heads)
    rows = edges[:, 0] * run.n_tokens + edges[:, 1]  # (layer, query t) of each edge
    hits.index_add_(0, rows, (weights >= threshold).float())
    return (hits > 0).reshape(run.n_layers, run.n_tokens, n_heads)


def route_components(run: ModelRun, route: Route) -> Components:
    """The components on ``route`` (see the module docstring for the definition)."""
    return Components(heads=head_mask(run, route, route.threshold), ffn=route.ffn.clone())


def heads_only(components: Components) -> Components:
    """The heads of ``components``, no FFN block."""
    return Components(heads=components.heads, ffn=torch.zeros_like(components.ffn))


def random_heads(like: Components, seed: int) -> Components:
    """As many heads as ``like`` has, drawn uniformly among all (layer, position, head); no FFN
    block."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(like.heads.numel(), dtype=torch.bool)
    flat[torch.randperm(like.heads.numel(), generator=gen)[: like.n_heads]] = True
    return Components(heads=flat.reshape(like.heads.shape), ffn=torch.zeros_like(like.ffn))


@dataclass(frozen=True)
class Score:
    """The metric with some components ablated."""

    ablated_heads: int
    ablated_ffn: int
    value: float
    share: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "ablated_heads": self.ablated_heads,
            "ablated_ffn": self.ablated_ffn,
            "value": self.value,
            "share": self.share,
        }


@dataclass(frozen=True)
class FaithfulnessReport:
    """Route vs complement vs random ablation, for one prompt, position and threshold."""

    position: int
    threshold: float
    renormalize: bool  # the route's weights were renormalized (its components are the same)
    mode: Mode
    metric: Metric
    target: str
    distractor: str | None
    n_route_heads: int
    n_route_ffn: int
    total_heads: int
    total_ffn: int
    full: float  # the metric of the unablated model
    all_ablated: float  # every component ablated
    route: Score  # route kept, the rest ablated
    complement: Score  # route ablated, the rest kept
    route_heads: Score  # only the route's heads ablated
    random: tuple[Score, ...]  # as many random heads ablated, one per seed
    seeds: tuple[int, ...]

    @property
    def random_share_mean(self) -> float:
        return float(torch.tensor([s.share for s in self.random]).mean())

    @property
    def random_share_sd(self) -> float:
        shares = torch.tensor([s.share for s in self.random], dtype=torch.float64)
        return float(shares.std()) if len(shares) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "threshold": self.threshold,
            "renormalize": self.renormalize,
            "mode": self.mode,
            "metric": self.metric,
            "target": self.target,
            "distractor": self.distractor,
            "components": {
                "heads_on_route": self.n_route_heads,
                "ffn_on_route": self.n_route_ffn,
                "total_heads": self.total_heads,
                "total_ffn": self.total_ffn,
            },
            "full": self.full,
            "all_ablated": self.all_ablated,
            "route": self.route.to_dict(),
            "complement": self.complement.to_dict(),
            "route_heads": self.route_heads.to_dict(),
            "random_heads": {
                "seeds": list(self.seeds),
                "values": [s.value for s in self.random],
                "shares": [s.share for s in self.random],
                "share_mean": self.random_share_mean,
                "share_sd": self.random_share_sd,
                "ablated_heads": self.route_heads.ablated_heads,
                "ablated_ffn": 0,
            },
        }


def faithfulness(
    trace: Trace,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    renormalize: bool = True,
    target: str | None = None,
    distractor: str | None = None,
    position: int = -1,
    mode: Mode = "mean",
    means: MeanActivations | None = None,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    on_step: Callable[[int, int], None] | None = None,
) -> FaithfulnessReport:
    """Faithfulness of ``trace``'s route to ``position`` at ``threshold`` (the trace must hold
    attention patterns: heads are tested on their per-head parts).

    Without ``target`` the model's own greedy prediction is the target; without ``distractor``
    the metric is the target's log-prob. ``4 + len(seeds)`` forward passes;
    ``on_step(done, total)`` reports them.
    """
    if distractor is not None and target is None:
        raise FaithfulnessError("a distractor needs a target too; pass both (or only a target)")
    if mode == "mean" and means is None:
        raise FaithfulnessError("mean ablation needs mean activations (a reference prompt file)")
    check_threshold(threshold)
    check_at_least("the number of random draws", len(seeds), 1)
    llm, run = trace.llm, trace.run
    p = trace.position(position)
    route = find_route(trace.graph, [p], threshold, renormalize=renormalize)
    if target is None:
        target_id = int(run.logits[p].argmax())
        target = llm.token_strings([target_id])[0]
        distractor_id = None
    elif distractor is None:
        target_id, distractor_id = single_token(llm, target, "target"), None
    else:
        target_id, distractor_id = contrast_ids(llm, target, distractor)
    metric: Metric = "target_logprob" if distractor_id is None else "logit_diff"

    def measure(logits: Tensor) -> float:
        row = logits[p].float()
        if distractor_id is None:
            return float(row.log_softmax(-1)[target_id])
        return float(row[target_id] - row[distractor_id])

    total_steps = 4 + len(seeds)
    done = 0

    def ablated(components: Components) -> float:
        nonlocal done
        hooks = components.hooks(llm, mode, means)
        value = measure(llm.logits_with_hooks(run.token_ids, hooks))
        done += 1
        if on_step is not None:
            on_step(done, total_steps)
        return value

    on_route = route_components(run, route)
    everything = Components(
        heads=torch.ones_like(on_route.heads), ffn=torch.ones_like(on_route.ffn)
    )
    full = measure(run.logits)
    all_ablated = ablated(everything)

    def score(ablated_set: Components) -> Score:
        value = ablated(ablated_set)
        if metric == "logit_diff":
            share = value / full if full != 0 else float("nan")
        else:
            span = full - all_ablated
            share = (value - all_ablated) / span if span != 0 else float("nan")
        return Score(ablated_set.n_heads, ablated_set.n_ffn, value, share)

    return FaithfulnessReport(
        position=p,
        threshold=threshold,
        renormalize=route.renormalize,
        mode=mode,
        metric=metric,
        target=target,
        distractor=distractor,
        n_route_heads=on_route.n_heads,
        n_route_ffn=on_route.n_ffn,
        total_heads=on_route.heads.numel(),
        total_ffn=on_route.ffn.numel(),
        full=full,
        all_ablated=all_ablated,
        route=score(on_route.complement()),
        complement=score(on_route),
        route_heads=score(heads_only(on_route)),
        random=tuple(score(random_heads(on_route, seed)) for seed in seeds),
        seeds=tuple(seeds),
    )
