"""How a route changes under an intervention: the route of the same prompt and output position,
before and after (e.g. an ablation, :func:`llm_flow.analyses.interventions.ablated_trace`), edge by
edge.

An edge (same source node, target node and kind) is ``kept`` when it is on both routes, ``lost``
when only the route before has it and ``gained`` when only the route after has it; its weight is
read on each route it is on (0 where it is not), so ``change = after − before``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import Tensor

from llm_flow.engine.edges import route_edges
from llm_flow.engine.routes import Route
from llm_flow.errors import RouteDiffError

Status = Literal["kept", "lost", "gained"]
STATUSES: tuple[Status, ...] = ("kept", "lost", "gained")
# Kept edges by how much their weight moved: an ablation can leave every edge on the route yet
# shrink one from 0.306 to 0.056, which "0 lost, 0 gained" hides.
Shift = Literal["weakened", "similar", "strengthened"]
SHIFTS: tuple[Shift, ...] = ("weakened", "similar", "strengthened")
DEFAULT_FACTOR = 2.0


def shift_of(before: float, after: float, factor: float = DEFAULT_FACTOR) -> Shift:
    """``weakened`` when the weight fell to 1/factor or less, ``strengthened`` when it grew
    factor-fold or more, else ``similar``."""
    if after * factor <= before:
        return "weakened"
    if after >= before * factor:
        return "strengthened"
    return "similar"


@dataclass(frozen=True)
class EdgeChange:
    source: str
    target: str
    kind: str
    status: Status
    before: float
    after: float

    @property
    def change(self) -> float:
        return self.after - self.before

    def shift(self, factor: float = DEFAULT_FACTOR) -> Shift | None:
        """How a kept edge's weight moved (:func:`shift_of`); None for a lost or gained one."""
        return shift_of(self.before, self.after, factor) if self.status == "kept" else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "kind": self.kind,
            "status": self.status,
            "shift": self.shift(),
            "before": self.before,
            "after": self.after,
            "change": self.change,
        }


@dataclass(frozen=True)
class RouteDiff:
    before: Route
    after: Route

    def __post_init__(self) -> None:
        b, a = self.before, self.after
        if b.graph.token_ids != a.graph.token_ids:
            raise RouteDiffError("the two routes are of different prompts")
        if (b.positions, b.threshold, b.renormalize) != (a.positions, a.threshold, a.renormalize):
            raise RouteDiffError(
                "the two routes differ in output position, threshold or renormalization: "
                f"{(b.positions, b.threshold, b.renormalize)} vs "
                f"{(a.positions, a.threshold, a.renormalize)}"
            )

    def part(self, status: Status) -> Route:
        """The edges of one status as a route (kept and gained edges carry the weights after,
        lost ones the weights before); its node masks are those of the route it comes from."""
        b, a = self.before, self.after
        if status == "lost":
            source, other, keep = b, a, False
        else:
            source, other, keep = a, b, status == "kept"
        on_other = other.contains(source.attention_idx)
        attention = on_other if keep else ~on_other  # [E] of the source route's edges
        return replace(
            source,
            attention_idx=source.attention_idx[attention],
            attention_weights=source.attention_weights[attention],
            attn_residual=source.attn_residual
            & (other.attn_residual if keep else ~other.attn_residual),
            ffn=source.ffn & (other.ffn if keep else ~other.ffn),
            ffn_residual=source.ffn_residual
            & (other.ffn_residual if keep else ~other.ffn_residual),
        )

    def kept_by_shift(self, factor: float = DEFAULT_FACTOR) -> dict[Shift, Route]:
        """The kept edges split by :func:`shift_of` (weights after), each as a route."""
        if factor <= 1:
            raise RouteDiffError(f"the change factor must be above 1, not {factor}")
        b, a = self.before, self.after
        kept = self.part("kept")
        was = b.attention_weights_at(kept.attention_idx)
        now = kept.attention_weights

        def classes(before: Tensor, after: Tensor) -> dict[Shift, Tensor]:
            weak = after * factor <= before
            strong = (after >= before * factor) & ~weak
            return {"weakened": weak, "similar": ~(weak | strong), "strengthened": strong}

        attention = classes(was, now)
        attn_res = classes(b.attn_residual_weights, a.attn_residual_weights)
        ffn = classes(b.ffn_weights, a.ffn_weights)
        ffn_res = classes(b.ffn_residual_weights, a.ffn_residual_weights)
        return {
            shift: replace(
                kept,
                attention_idx=kept.attention_idx[attention[shift]],
                attention_weights=now[attention[shift]],
                attn_residual=kept.attn_residual & attn_res[shift],
                ffn=kept.ffn & ffn[shift],
                ffn_residual=kept.ffn_residual & ffn_res[shift],
            )
            for shift in SHIFTS
        }

    def counts(self, factor: float = DEFAULT_FACTOR) -> dict[str, int]:
        """Edges lost and gained, and kept edges weakened / similar / strengthened by
        ``factor``."""
        edges = self.edges()
        out: dict[str, int] = {s: sum(e.status == s for e in edges) for s in STATUSES}
        shifts = [e.shift(factor) for e in edges]
        out.update({shift: shifts.count(shift) for shift in SHIFTS})
        return out

    def edges(self) -> list[EdgeChange]:
        """Every edge on either route, largest |change| first (ties: node order)."""
        before = {
            (e["source"], e["target"], e["kind"]): e["weight"] for e in route_edges(self.before)
        }
        after = {
            (e["source"], e["target"], e["kind"]): e["weight"] for e in route_edges(self.after)
        }
        changes = []
        for key in before.keys() | after.keys():
            status: Status = (
                "kept"
                if key in before and key in after
                else ("lost" if key in before else "gained")
            )
            changes.append(EdgeChange(*key, status, before.get(key, 0.0), after.get(key, 0.0)))
        return sorted(changes, key=lambda c: (-abs(c.change), c.source, c.target, c.kind))

    def to_dict(self) -> dict[str, Any]:
        edges = self.edges()
        return {
            "threshold": self.before.threshold,
            "renormalize": self.before.renormalize,
            "positions": list(self.before.positions),
            "n_edges": {s: sum(e.status == s for e in edges) for s in STATUSES},
            "n_kept_by_change": {k: v for k, v in self.counts().items() if k in SHIFTS},
            "change_factor": DEFAULT_FACTOR,
            "edges": [e.to_dict() for e in edges],
        }
