"""Run an ablation on a trace and report what changed (:mod:`llm_flow.analyses.interventions`
says what ablating a head, neuron, FFN block or edge replaces).

One place for the before / after orchestration every front end uses: the trace *is* the run
before; :func:`ablate` adds one forward pass with the ablation's hooks, :func:`ablated_trace`
traces that pass (its contribution graph, every self-check holding), and
:meth:`AblationResult.route_diff` compares the two routes edge by edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from llm_flow.analyses.interventions import Ablation, MeanActivations, ablation_hooks, validate
from llm_flow.analyses.route_diff import RouteDiff
from llm_flow.engine.routes import DEFAULT_THRESHOLD, find_route
from llm_flow.engine.trace import Trace, trace
from llm_flow.errors import InterventionError
from llm_flow.models.base import Hook, TransparentLlm
from llm_flow.validate import check_at_least, check_position, check_threshold

TOP_K = 5


def ablated_logits(
    llm: TransparentLlm,
    token_ids: Sequence[int],
    ablation: Ablation,
    means: MeanActivations | None = None,
) -> Tensor:
    """Logits [T, V] (float32) of one forward pass over ``token_ids`` with ``ablation`` applied
    (validated here). Model level, no trace: for scoring many prompts under one ablation."""
    checked = validate(ablation, llm.info, len(token_ids))
    return llm.logits_with_hooks(token_ids, ablation_hooks(llm, checked, len(token_ids), means))


def ablated_trace(
    before: Trace,
    ablation: Ablation,
    means: MeanActivations | None = None,
    *,
    keep_patterns: bool | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    hooks: Sequence[Hook] = (),
) -> Trace:
    """The trace of ``before``'s prompt with ``ablation`` applied (validated here).

    Every self-check holds for the ablated pass: an ablated head reads from no token, and what
    it writes instead (the mean, under mean ablation) is booked as that token's bias, a part no
    node writes; ablated neurons write their replacement value inside their FFN block; what an
    intervention writes into a mixture-of-experts block that no expert explains (an ablated
    expert's mean part) is booked as the block's bias. ``hooks`` are further edits applied with
    the ablation's (SAE latents: :mod:`llm_flow.analyses.latents`).
    """
    llm, n_tokens = before.llm, before.n_tokens
    checked = validate(ablation, llm.info, n_tokens)
    edits = [*ablation_hooks(llm, checked, n_tokens, means), *hooks]
    return trace(
        llm,
        before.prompt,
        keep_patterns=keep_patterns,
        attention_floor=before.graph.attention_floor,  # routes compare like with like
        on_layer=on_layer,
        fwd_hooks=edits,
    )


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
    llm: TransparentLlm,
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
    """The prediction after ``position`` before and with ``ablation``; ``traces`` holds the
    trace before and the traced ablated run when the ablation was traced
    (:func:`ablate` with ``traced=True``), for :meth:`route_diff`."""

    ablation: Ablation
    position: int
    before: Outcome
    after: Outcome
    means_source: str | None = None
    traces: tuple[Trace, Trace] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "ablated": self.ablation.to_dict() | {"mean_prompts": self.means_source},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }

    def route_diff(
        self, threshold: float = DEFAULT_THRESHOLD, renormalize: bool = True
    ) -> RouteDiff:
        """The routes to :attr:`position` at ``threshold`` before and after, edge by edge."""
        if self.traces is None:
            raise InterventionError(
                "this ablation was not traced, so it has no route to compare; "
                "run it with traced=True"
            )
        check_threshold(threshold)
        before, after = (
            find_route(t.graph, [self.position], threshold, renormalize) for t in self.traces
        )
        return RouteDiff(before, after)


def ablate(
    trace: Trace,
    ablation: Ablation,
    *,
    means: MeanActivations | None = None,
    target_id: int | None = None,
    distractor_id: int | None = None,
    position: int = -1,
    k: int = TOP_K,
    traced: bool = False,
    on_layer: Callable[[int, int], None] | None = None,
    hooks: Sequence[Hook] = (),
) -> AblationResult:
    """The prediction after ``position`` of ``trace`` (the run before) and of its prompt with
    ``ablation`` applied: one more forward pass, or with ``traced`` a traced one whose route
    :meth:`AblationResult.route_diff` compares (``on_layer(done, total)`` reports its layers).
    With ``target_id`` (and ``distractor_id``) the outcomes carry the target's log-prob (and
    the logit difference). ``hooks`` are further edits applied with the ablation's."""
    llm = trace.llm
    p = check_position(position, trace.n_tokens)
    check_at_least("the number of top tokens", k, 1)
    checked = validate(ablation, llm.info, trace.n_tokens)
    traces = None
    if traced:
        after_trace = ablated_trace(
            trace, checked, means, keep_patterns=False, on_layer=on_layer, hooks=hooks
        )
        after, traces = after_trace.run.logits, (trace, after_trace)
    else:
        edits = [*ablation_hooks(llm, checked, trace.n_tokens, means), *hooks]
        after = llm.logits_with_hooks(trace.token_ids, edits)
    ids_kw = {"target_id": target_id, "distractor_id": distractor_id}
    return AblationResult(
        ablation=checked,
        position=p,
        before=outcome(llm, trace.run.logits[p], k=k, **ids_kw),
        after=outcome(llm, after[p], k=k, **ids_kw),
        means_source=means.source if means is not None and checked.mode == "mean" else None,
        traces=traces,
    )
