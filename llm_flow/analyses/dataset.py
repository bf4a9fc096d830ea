"""Dataset mode: which heads and FFN blocks do the routes of many prompts go through?

The head-frequency analysis of Ferrando & Voita 2024 ("Information Flow Routes", arXiv
2403.00824, §5): run every prompt of a file, extract the route to its **last token** at threshold
τ, and count, per layer and position class, how often each component is on it.

- A **head** (l, h) *appears* in a prompt's route, in position class c, when some attention edge
  of the route into ``A{l}_t`` with t in c has a per-head contribution of head h of at least τ
  (per-head parts normalized together with the residual, as the LLM Transparency Tool does; raw
  weights, no renormalization).
- An **FFN block** l appears in class c when some ``M{l}_t`` with t in c is on the route.
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
    "position_class",
    "count",
    "n_prompts",
    "frequency",
    "appearances",
    "mean_weight",
)
TABLE_SUFFIXES = (".csv", ".parquet")
KEYS = ["kind", "layer", "head", "position_class"]


@dataclass(frozen=True)
class Appearances:
    """Which components one prompt's route goes through, per position class (0 last, 1 other)."""

    heads: Tensor  # [L, 2, H] bool
    head_hits: Tensor  # [L, 2, H] number of route edges on which the head reached τ
    head_weight: Tensor  # [L, 2, H] sum of its per-head contributions on those edges
    ffn: Tensor  # [L, 2] bool
    ffn_hits: Tensor  # [L, 2] number of FFN nodes on the route
    ffn_weight: Tensor  # [L, 2] sum of their edge weights


_FIELDS = ("heads", "head_hits", "head_weight", "ffn", "ffn_hits", "ffn_weight")


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
    return Appearances(
        heads=hits > 0,
        head_hits=hits,
        head_weight=weight,
        ffn=ffn_cls > 0,
        ffn_hits=ffn_cls.float(),
        ffn_weight=ffn_weight,
    )


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
    import pandas as pd

    if not prompts:
        raise DatasetError("no prompts to run; the prompt file must hold one prompt per line")
    check_threshold(threshold)
    counts: list[Appearances] = []
    for i, prompt in enumerate(prompts):
        tr = trace(llm, prompt)
        route = find_route(tr.graph, [-1], threshold, renormalize=False)
        counts.append(route_appearances(tr.run, route, threshold))
        if on_prompt is not None:
            on_prompt(i + 1, len(prompts))
    total = Appearances(
        *(torch.stack([getattr(a, f).float() for a in counts]).sum(0) for f in _FIELDS)
    )
    n = len(prompts)
    n_layers, _, n_heads = total.heads.shape
    layer_idx = torch.arange(n_layers)
    head_rows = pd.DataFrame(
        {
            "kind": "head",
            "layer": layer_idx[:, None, None].expand(-1, 2, n_heads).flatten().tolist(),
            "head": torch.arange(n_heads).expand(n_layers, 2, -1).flatten().tolist(),
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
            "position_class": list(POSITION_CLASSES) * n_layers,
            "count": total.ffn.long().flatten().tolist(),
            "appearances": total.ffn_hits.long().flatten().tolist(),
            "weight_sum": total.ffn_weight.flatten().tolist(),
        }
    )
    frame = pd.concat([head_rows, ffn_rows], ignore_index=True)
    frame["n_prompts"] = n
    frame["frequency"] = frame["count"] / n
    hits = frame["appearances"].where(frame["appearances"] > 0, 1)
    frame["mean_weight"] = frame["weight_sum"].where(frame["appearances"] > 0, 0.0) / hits
    frame = frame.astype({"head": "Int64"})
    return frame[list(COLUMNS)]


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
