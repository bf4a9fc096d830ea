"""Dataset mode: which heads and FFN blocks do the routes of many prompts go through?

The head-frequency analysis of Ferrando & Voita 2024 ("Information Flow Routes", arXiv
2403.00824, §5): run every prompt of a file, extract the route to its **last token** at threshold
τ, and count, per layer and position class, how often each component is on it.

- A **head** (l, h) *appears* in a prompt's route, in position class c, when some attention edge
  of the route into ``A{l}_t`` with t in c has a per-head contribution of head h of at least τ
  (per-head parts normalized together with the residual, as the LLM Transparency Tool does; raw
  weights, no renormalization).
- An **FFN block** l appears in class c when some ``M{l}_t`` with t in c is on the route.
- A routed **expert** (l, e) of a mixture-of-experts layer appears in class c when some
  ``M{l}_t`` on the route with t in c has an expert contribution of e of at least τ (expert parts
  normalized together with the FFN bias and the residual, like neurons); the **shared expert**
  of such a layer is counted the same way (kind ``shared_expert``).
- Position classes: ``last`` (t is the last token, the route's output position) and ``other``.

Per (kind, layer, head, position_class): ``count`` = prompts in which it appears, ``frequency``
= count / n_prompts ∈ [0, 1], ``appearances`` = (prompt, edge or node) pairs where it appeared,
``mean_weight`` = mean contribution over those appearances (0 where it never appears).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llm_flow.engine.graph import exact_floor, layer_expert_contributions
from llm_flow.engine.routes import DEFAULT_THRESHOLD, Route, find_route, route_head_weights
from llm_flow.engine.trace import trace
from llm_flow.errors import DatasetError
from llm_flow.models.base import ModelRun, TransparentLlm
from llm_flow.validate import check_threshold

if TYPE_CHECKING:
    import pandas as pd

POSITION_CLASSES = ("last", "other")
COLUMNS = (
    "kind",
    "layer",
    "head",
    "expert",
    "position_class",
    "count",
    "n_prompts",
    "frequency",
    "appearances",
    "mean_weight",
)
TABLE_SUFFIXES = (".csv", ".parquet")
_ROW_COLUMNS = (
    "kind",
    "layer",
    "head",
    "expert",
    "position_class",
    "count",
    "appearances",
    "weight_sum",
)
KEYS = ["kind", "layer", "head", "expert", "position_class"]


@dataclass(frozen=True)
class Appearances:
    """Which components one prompt's route goes through, per position class (0 last, 1 other)."""

    heads: Tensor  # [L, 2, H] bool
    head_hits: Tensor  # [L, 2, H] number of route edges on which the head reached τ
    head_weight: Tensor  # [L, 2, H] sum of its per-head contributions on those edges
    ffn: Tensor  # [L, 2] bool
    ffn_hits: Tensor  # [L, 2] number of FFN nodes on the route
    ffn_weight: Tensor  # [L, 2] sum of their edge weights
    experts: Tensor  # [L, 2, E + 1] bool; the last column is the shared expert
    expert_hits: Tensor  # [L, 2, E + 1] number of route FFN nodes where it reached τ
    expert_weight: Tensor  # [L, 2, E + 1] sum of its contributions there
    shared: bool = False  # whether the model has a shared expert (rows of kind shared_expert)


def _total(counts: Sequence[Appearances]) -> Appearances:
    """Every field summed over the prompts, in their order (as float)."""

    def total(field: str) -> Tensor:
        return torch.stack([getattr(a, field).float() for a in counts]).sum(0)

    return Appearances(
        heads=total("heads"),
        head_hits=total("head_hits"),
        head_weight=total("head_weight"),
        ffn=total("ffn"),
        ffn_hits=total("ffn_hits"),
        ffn_weight=total("ffn_weight"),
        experts=total("experts"),
        expert_hits=total("expert_hits"),
        expert_weight=total("expert_weight"),
        shared=any(a.shared for a in counts),
    )


def route_appearances(run: ModelRun, route: Route, threshold: float) -> Appearances:
    """The :class:`Appearances` of one route (its output position is the class ``last``)."""
    n_layers = run.n_layers
    n_heads = run.layers[0].values.shape[1]
    last = route.positions[0]
    hits = torch.zeros(n_layers, 2, n_heads)
    weight = torch.zeros(n_layers, 2, n_heads)
    edges, w = route_head_weights(run, route)  # [E, 3] (layer, t, s), [E, H]
    strong = w >= threshold
    cells = edges[:, 0] * 2 + (edges[:, 1] != last).long()  # (layer, class: 0 last, 1 other)
    hits.view(-1, n_heads).index_add_(0, cells, strong.float())
    weight.view(-1, n_heads).index_add_(0, cells, torch.where(strong, w, 0.0))
    ffn_at = route.ffn.long()  # [L, T]
    ffn_cls = torch.stack([ffn_at[:, last], ffn_at.sum(1) - ffn_at[:, last]], 1)  # [L, 2]
    ffn_w = route.ffn_weights * route.ffn  # [L, T]
    ffn_weight = torch.stack([ffn_w[:, last], ffn_w.sum(1) - ffn_w[:, last]], 1)
    expert_hits, expert_weight = _expert_appearances(run, route, threshold)
    return Appearances(
        heads=hits > 0,
        head_hits=hits,
        head_weight=weight,
        ffn=ffn_cls > 0,
        ffn_hits=ffn_cls.float(),
        ffn_weight=ffn_weight,
        experts=expert_hits > 0,
        expert_hits=expert_hits,
        expert_weight=expert_weight,
        shared=any(
            lr.experts is not None and lr.experts.shared_acts is not None for lr in run.layers
        ),
    )


def _expert_appearances(run: ModelRun, route: Route, threshold: float) -> tuple[Tensor, Tensor]:
    """(hits, weight sums) [L, 2, E + 1] of the experts of every MoE block on ``route``."""
    n_experts = max((lr.experts.n_experts for lr in run.layers if lr.experts), default=0)
    hits = torch.zeros(run.n_layers, 2, n_experts + 1)
    weight = torch.zeros_like(hits)
    last = route.positions[0]
    for lr in run.layers:
        rows = route.ffn[lr.index].nonzero().flatten()
        if lr.experts is None or not len(rows):
            continue
        shares, _ = layer_expert_contributions(lr, rows.to(lr.resid_post.device))
        shares = shares.cpu()  # [R, E + 1]
        routed = torch.zeros_like(shares, dtype=torch.bool)  # unrouted experts are no part
        routed.scatter_(1, lr.experts.index[rows].long().cpu(), True)
        routed[:, -1] = lr.experts.shared_acts is not None
        strong = routed & (shares >= threshold)
        cls = (rows != last).long()  # 0 last, 1 other
        hits[lr.index].index_add_(0, cls, strong.float())
        weight[lr.index].index_add_(0, cls, torch.where(strong, shares, 0.0))
    return hits, weight


def check_dataset(prompts: Sequence[str], threshold: float) -> None:
    """What dataset mode needs before any model runs: some prompts and τ in [0, 1]."""
    if not prompts:
        raise DatasetError("no prompts to run; the prompt file must hold one prompt per line")
    check_threshold(threshold)


def prompt_appearances(llm: TransparentLlm, prompt: str, threshold: float) -> Appearances:
    """Trace one prompt and return the :class:`Appearances` of its route to the last token."""
    tr = trace(llm, prompt, attention_floor=exact_floor(threshold))
    route = find_route(tr.graph, [-1], threshold, renormalize=False)
    return route_appearances(tr.run, route, threshold)


def dataset_frequencies(
    llm: TransparentLlm,
    prompts: Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    on_prompt: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Run every prompt, extract its route to the last token and aggregate (columns
    :data:`COLUMNS`; ``head`` is empty for FFN rows). ``on_prompt(done, total)`` reports
    progress."""
    check_dataset(prompts, threshold)
    counts: list[Appearances] = []
    for i, prompt in enumerate(prompts):
        counts.append(prompt_appearances(llm, prompt, threshold))
        if on_prompt is not None:
            on_prompt(i + 1, len(prompts))
    return frequency_table(counts, llm.info.moe_layers)


def frequency_table(counts: Sequence[Appearances], moe_layers: Sequence[int]) -> pd.DataFrame:
    """The dataset table of the prompts whose appearances are ``counts`` (in prompt order: the
    weight sums add in that order, so the same list gives the same table bit for bit)."""
    import pandas as pd

    total = _total(counts)
    n = len(counts)
    n_layers, _, n_heads = total.heads.shape
    layer_idx = torch.arange(n_layers)
    head_rows = pd.DataFrame(
        {
            "kind": "head",
            "layer": layer_idx[:, None, None].expand(-1, 2, n_heads).flatten().tolist(),
            "head": torch.arange(n_heads).expand(n_layers, 2, -1).flatten().tolist(),
            "expert": None,
            "position_class": [POSITION_CLASSES[c] for c in [0, 1] for _ in range(n_heads)]
            * n_layers,
            "count": total.heads.long().flatten().tolist(),
            "appearances": total.head_hits.long().flatten().tolist(),
            "weight_sum": total.head_weight.flatten().tolist(),
        }
    )
    ffn_rows = pd.DataFrame(
        {
            "kind": "ffn",
            "layer": layer_idx[:, None].expand(-1, 2).flatten().tolist(),
            "head": None,
            "expert": None,
            "position_class": list(POSITION_CLASSES) * n_layers,
            "count": total.ffn.long().flatten().tolist(),
            "appearances": total.ffn_hits.long().flatten().tolist(),
            "weight_sum": total.ffn_weight.flatten().tolist(),
        }
    )
    parts = [head_rows, ffn_rows, _expert_rows(total, moe_layers)]
    frame = pd.concat([p for p in parts if len(p)], ignore_index=True)
    frame["n_prompts"] = n
    frame["frequency"] = frame["count"] / n
    hits = frame["appearances"].where(frame["appearances"] > 0, 1)
    frame["mean_weight"] = frame["weight_sum"].where(frame["appearances"] > 0, 0.0) / hits
    frame = frame.astype({"head": "Int64", "expert": "Int64", "layer": "int64"})
    return frame[list(COLUMNS)]


def _expert_rows(total: Appearances, moe_layers: Sequence[int]) -> pd.DataFrame:
    """Rows of the routed experts (and the shared expert, where the model has one) of every
    mixture-of-experts layer."""
    import pandas as pd

    n_experts = total.experts.shape[-1] - 1
    rows = []
    for layer in moe_layers:
        for e in range(n_experts + (1 if total.shared else 0)):
            for c, cls in enumerate(POSITION_CLASSES):
                rows.append(
                    {
                        "kind": "expert" if e < n_experts else "shared_expert",
                        "layer": layer,
                        "head": None,
                        "expert": e if e < n_experts else None,
                        "position_class": cls,
                        "count": int(total.experts[layer, c, e]),
                        "appearances": int(total.expert_hits[layer, c, e]),
                        "weight_sum": float(total.expert_weight[layer, c, e]),
                    }
                )
    return pd.DataFrame(rows, columns=list(_ROW_COLUMNS))


@dataclass(frozen=True)
class DatasetComparison:
    """Two dataset tables and their difference (``b − a``) per component and position class."""

    a: pd.DataFrame
    b: pd.DataFrame
    diff: pd.DataFrame  # KEYS + frequency_a, frequency_b, frequency_diff, mean_weight_a/_b


def compare_tables(a: pd.DataFrame, b: pd.DataFrame) -> DatasetComparison:
    """Join two :func:`dataset_frequencies` tables on (kind, layer, head, position_class)."""
    cols = [*KEYS, "frequency", "mean_weight"]
    diff = a[cols].merge(b[cols], on=KEYS, how="outer", suffixes=("_a", "_b"))
    diff = diff.fillna({"frequency_a": 0.0, "frequency_b": 0.0})
    diff["frequency_diff"] = diff["frequency_b"] - diff["frequency_a"]
    return DatasetComparison(a=a, b=b, diff=diff)


def compare_prompts(
    llm: TransparentLlm,
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    on_prompt: Callable[[int, int], None] | None = None,
) -> DatasetComparison:
    """Dataset tables of two prompt lists and their difference; ``on_prompt(done, total)``
    counts the prompts of both lists together."""
    total = len(prompts_a) + len(prompts_b)

    def offset(base: int) -> Callable[[int, int], None] | None:
        if on_prompt is None:
            return None
        report = on_prompt
        return lambda done, _: report(base + done, total)

    a = dataset_frequencies(llm, prompts_a, threshold=threshold, on_prompt=offset(0))
    b = dataset_frequencies(llm, prompts_b, threshold=threshold, on_prompt=offset(len(prompts_a)))
    return compare_tables(a, b)


def check_table_path(path: str | Path) -> Path:
    """A path :func:`write_table` can write: ``*.csv`` or ``*.parquet``."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DatasetError(f"cannot write {str(path)!r}: the output must end in .csv or .parquet")
    return path


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write CSV (``*.csv``) or parquet (``*.parquet``)."""
    path = check_table_path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
    except OSError as exc:
        raise DatasetError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
