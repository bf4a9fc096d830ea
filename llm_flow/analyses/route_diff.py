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

from llm_flow.engine.edges import route_edges
from llm_flow.engine.routes import Route
from llm_flow.errors import RouteDiffError

Status = Literal["kept", "lost", "gained"]
STATUSES: tuple[Status, ...] = ("kept", "lost", "gained")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "kind": self.kind,
            "status": self.status,
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
            "edges": [e.to_dict() for e in edges],
        }
