"""The explorer's tables as pandas frames: token tables (logit lens, promoted/suppressed), the
contrast effect table, a residual node's SAE latents, an ablation's top tokens, the faithfulness
report and a route diff."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from app.selection import effect_selection
from llm_flow.analyses.ablation import Outcome
from llm_flow.analyses.contrast import small_weight_large_effect
from llm_flow.analyses.edge_latents import EdgeLatents
from llm_flow.analyses.faithfulness import FaithfulnessReport
from llm_flow.analyses.latents import Latents
from llm_flow.analyses.lens import TokenScore
from llm_flow.analyses.route_diff import DEFAULT_FACTOR, EdgeChange
from llm_flow.engine.nodes import parse_node
from llm_flow.io.text import display_token


def rank_change_text(change: int | None) -> str:
    if change is None:
        return ""
    if change > 0:
        return f"↑{change}"
    if change < 0:
        return f"↓{-change}"
    return "="


def table_token(token: str, token_id: int | None = None) -> str:
    """A token for a table cell: spaces shown as ␣, so " French" and "French" differ.

    A byte-level token that is only part of a UTF-8 character decodes to "�"; its id tells
    such tokens apart.
    """
    text = display_token(token).replace(" ", "␣")
    return f"{text} #{token_id}" if "\ufffd" in text and token_id is not None else text


def token_table(scores: Sequence[TokenScore], *, lens: bool = False) -> pd.DataFrame:
    """A token table; ``lens`` adds probability and rank change (vs the node below)."""
    rows: dict[str, list[object]] = {
        "token": [table_token(s.token, s.token_id) for s in scores],
        "logit": [round(s.logit, 3) for s in scores],
    }
    if lens:
        rows["prob"] = [None if s.prob is None else round(s.prob, 4) for s in scores]
        rows["rank"] = [rank_change_text(s.rank_change) for s in scores]
    return pd.DataFrame(rows)


# -- contrast ---------------------------------------------------------------------------------


FLAG = "small weight, large effect"


def effect_table(
    frame: pd.DataFrame,
    tokens: Sequence[str],
    threshold: float | None = None,
    logit_diff: float | None = None,
) -> pd.DataFrame:
    """The contrast effect table as shown (``analyse_contrast(...).frame()`` plus a ``tokens``
    column): strongest first by ``max(|direct_effect|, |attribution|)``. With ``threshold``
    and ``logit_diff`` a :data:`FLAG` column marks the rows of
    :func:`~llm_flow.analyses.contrast.small_weight_large_effect`."""
    strength = np.maximum(frame["direct_effect"].abs(), frame["attribution"].abs())
    table = frame.loc[strength.sort_values(ascending=False, kind="stable").index]
    table = table.reset_index(drop=True)
    if threshold is not None and logit_diff is not None:
        weights = [None if pd.isna(w) else float(w) for w in table["weight"]]
        table[FLAG] = [
            small_weight_large_effect(w, float(d), float(a), threshold, logit_diff)
            for w, d, a in zip(weights, table["direct_effect"], table["attribution"], strict=True)
        ]
    words = [
        table_token(tokens[t])
        if k != "head"
        else f"{table_token(tokens[s])} → {table_token(tokens[t])}"
        for k, s, t in zip(table["kind"], table["source"], table["target"], strict=True)
    ]
    table.insert(table.columns.get_loc("node") + 1, "tokens", words)
    return table


def effect_ids(table: pd.DataFrame) -> tuple[str, ...]:
    """Each row's selection string (what the graph highlights when the row is selected)."""
    return tuple(
        effect_selection(k, int(layer), int(s), int(t))
        for k, layer, s, t in zip(
            table["kind"], table["layer"], table["source"], table["target"], strict=True
        )
    )


def effect_units(table: pd.DataFrame) -> tuple[int | None, ...]:
    """Each row's head, neuron or routed expert; ``None`` for FFN blocks and shared experts."""
    column = {"head": "head", "neuron": "neuron", "expert": "expert"}
    return tuple(
        int(table[column[k]].iloc[i]) if k in column else None for i, k in enumerate(table["kind"])
    )


# -- SAE latents ------------------------------------------------------------------------------


B_DEC = "b_dec"
ERROR = "error ε"
LATENT_COLUMNS = ["latent", "activation", "contribution", "direct effect"]
DIFF_COLUMN = "Δ target − distractor"


def latents_table(result: Latents, contrast: bool) -> pd.DataFrame:
    """One row per listed latent (by contribution, as :func:`~llm_flow.analyses.latents.latents`
    lists them: row i is ``result.latents[i]``), then the other active latents together when
    some are not listed, then ``b_dec`` and the error, always: the contributions sum to 1.
    ``contrast`` adds each latent's direct effect on target − distractor."""
    rest = result.latents_contribution - sum(latent.contribution for latent in result.latents)
    n_rest = result.l0 - len(result.latents)
    rows: list[tuple[object, ...]] = [
        (
            str(latent.index),
            latent.activation,
            latent.contribution,
            latent.direct_effect,
            latent.direct_effect_diff,
            " ".join(table_token(t) for t in latent.promoted),
            " ".join(table_token(t) for t in latent.suppressed),
        )
        for latent in result.latents
    ]
    if n_rest:
        rows.append((f"{n_rest} other active", None, rest, None, None, "", ""))
    rows += [
        (name, None, contribution, effect, diff, "", "")
        for name, contribution, effect, diff in (
            (
                B_DEC,
                result.b_dec_contribution,
                result.b_dec_direct_effect,
                result.b_dec_direct_effect_diff,
            ),
            (
                ERROR,
                result.error_contribution,
                result.error_direct_effect,
                result.error_direct_effect_diff,
            ),
        )
    ]
    table = pd.DataFrame(rows, columns=[*LATENT_COLUMNS, DIFF_COLUMN, "promotes", "suppresses"])
    return table if contrast else table.drop(columns=DIFF_COLUMN)


EDGE_LATENT_COLUMNS = ["part", "activation", "contribution"]
BIAS = "biases (norm, value)"


def edge_latents_table(result: EdgeLatents) -> pd.DataFrame:
    """One row per listed latent of the edge's source (by contribution to the edge's part), then
    the other active latents together when some are not listed, then ``b_dec``, the biases and
    the error, always: the contributions sum to 1."""
    rest = result.latents_contribution - sum(latent.contribution for latent in result.latents)
    n_rest = result.l0 - len(result.latents)
    rows: list[tuple[object, ...]] = [
        (f"latent {latent.index}", latent.activation, latent.contribution)
        for latent in result.latents
    ]
    if n_rest:
        rows.append((f"{n_rest} other active latents", None, rest))
    rows += [
        (B_DEC, None, result.b_dec_contribution),
        (BIAS, None, result.bias_contribution),
        (ERROR, None, result.error_contribution),
    ]
    return pd.DataFrame(rows, columns=EDGE_LATENT_COLUMNS)


# -- interventions ----------------------------------------------------------------------------


def top_tokens_table(result: Outcome) -> pd.DataFrame:
    """The top tokens of an ablation's before or after prediction."""
    return pd.DataFrame(
        {
            "token": [table_token(t.token, t.id) for t in result.top],
            "prob": [round(t.prob, 4) for t in result.top],
        }
    )


def faithfulness_table(report: FaithfulnessReport) -> pd.DataFrame:
    """One row per ablation of the faithfulness check; ``share`` is the fraction of the full
    model's metric that survives (random heads: the mean over seeds)."""
    n_random = len(report.random)
    random_value = float(np.mean([s.value for s in report.random])) if n_random else float("nan")
    everything_share = (
        report.all_ablated / report.full
        if report.metric == "logit_diff" and report.full != 0
        else 0.0
    )
    rows = [
        ("nothing (full model)", 0, 0, report.full, 1.0),
        (
            "everything but the route",
            report.route.ablated_heads,
            report.route.ablated_ffn,
            report.route.value,
            report.route.share,
        ),
        (
            "the route",
            report.complement.ablated_heads,
            report.complement.ablated_ffn,
            report.complement.value,
            report.complement.share,
        ),
        (
            "the route's heads",
            report.route_heads.ablated_heads,
            0,
            report.route_heads.value,
            report.route_heads.share,
        ),
        (
            f"as many random heads ({n_random} draws)",
            report.route_heads.ablated_heads,
            0,
            random_value,
            report.random_share_mean if n_random else float("nan"),
        ),
        ("everything", report.total_heads, report.total_ffn, report.all_ablated, everything_share),
    ]
    metric = "logit diff" if report.metric == "logit_diff" else "target log-prob"
    return pd.DataFrame(
        rows, columns=["ablated", "head positions", "FFN blocks", metric, "share of full"]
    )


def route_diff_table(
    edges: Sequence[EdgeChange], tokens: Sequence[str], factor: float = DEFAULT_FACTOR
) -> pd.DataFrame:
    """The edges of a route diff (largest |change| first, as :meth:`RouteDiff.edges` gives
    them) with the tokens they connect, and how a kept edge moved: weakened to ≤ 1/factor,
    strengthened ≥ factor×, or similar (the figure's colours)."""

    def token_of(name: str) -> str:
        node = parse_node(name)
        if node is None:
            raise ValueError(f"{name!r} is not a node id")
        return table_token(tokens[node.token])

    rows = [
        (
            e.status,
            e.shift(factor) or "",
            e.kind,
            f"{e.source} → {e.target}",
            token_of(e.source)
            if e.kind != "attention"
            else f"{token_of(e.source)} → {token_of(e.target)}",
            e.before,
            e.after,
            e.change,
        )
        for e in edges
    ]
    columns = ["status", "shift", "kind", "edge", "tokens", "before", "after", "change"]
    return pd.DataFrame(rows, columns=columns)
