"""The "why A instead of B?" view: target vs distractor logits and the route's effect table.

The numbers are :func:`llm_flow.analyses.contrast.analyse_contrast`'s (direct logit attribution
through the frozen-scale final norm, and activation × gradient); this module lays them out.
Selecting a row of the table selects its attention edge or FFN block in the graph
(:func:`app.session.take_table_selection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from app import cache, session
from app.cache import CachedTrace
from app.figures import tables
from app.views.errors import show_error
from llm_flow.analyses.contrast import LARGE_EFFECT_SHARE, ContrastAnalysis
from llm_flow.engine.routes import Route
from llm_flow.errors import ContrastError
from llm_flow.io.text import display_token, markdown_text

TABLE_HEIGHT = 380
_NUMBER = "%.3f"


@dataclass(frozen=True)
class ContrastView:
    """What the contrast section shows: an analysis and its table, or an error, or nothing."""

    analysis: ContrastAnalysis | None = None
    table: pd.DataFrame | None = None
    error: str | None = None

    @property
    def pair(self) -> tuple[str, str] | None:
        """(target, distractor) when both are valid tokens."""
        if self.analysis is None:
            return None
        return self.analysis.contrast.target, self.analysis.contrast.distractor


def prepare(cached: CachedTrace, route: Route, target: str, distractor: str) -> ContrastView:
    """Analyse the contrast (cached) and apply a newly selected table row to the selection.

    Runs before the graph is drawn, so a row's highlight shows in the same run.
    """
    if not target and not distractor:
        return ContrastView()
    try:
        analysis = cache.contrast_analysis(cached, route, target, distractor)
    except ContrastError as exc:
        return ContrastView(error=str(exc))
    table = tables.effect_table(
        analysis.frame(), cached.trace.tokens, route.threshold, analysis.contrast.logit_diff
    )
    session.take_table_selection(tables.effect_ids(table), tables.effect_units(table))
    return ContrastView(analysis, table)


def _quoted(token: str) -> str:
    return f"“{markdown_text(display_token(token))}”"


def summary(view: ContrastView) -> None:
    """One line above the graph: the two logits and their difference (details below it), or
    why the tokens cannot be used."""
    if view.error is not None:
        show_error(
            view.error,
            "Type one token each as target and distractor in the sidebar "
            "(words in mid-sentence usually start with a space, e.g. “ Mary”).",
        )
        return
    if view.analysis is None:
        return
    c = view.analysis.contrast
    st.markdown(
        f"Target {_quoted(c.target)} logit {c.target_logit:.2f}, distractor "
        f"{_quoted(c.distractor)} {c.distractor_logit:.2f}: logit difference "
        f"**{c.logit_diff:+.2f}**. Which heads and neurons make it: the table below the graph."
    )


def contrast_section(view: ContrastView) -> None:
    if view.analysis is None or view.table is None:
        return
    c = view.analysis.contrast
    st.markdown(f"#### Why {_quoted(c.target)} instead of {_quoted(c.distractor)}?")
    left, middle, right = st.columns(3)
    left.metric(f"logit {display_token(c.target)}", f"{c.target_logit:.2f}")
    middle.metric(f"logit {display_token(c.distractor)}", f"{c.distractor_logit:.2f}")
    right.metric("logit difference", f"{c.logit_diff:+.2f}")
    st.dataframe(
        view.table,
        key=session.EFFECTS_TABLE,
        on_select="rerun",
        selection_mode="single-row",
        hide_index=True,
        width="stretch",
        height=TABLE_HEIGHT,
        column_config={
            "weight": st.column_config.NumberColumn(format=_NUMBER),
            "direct_effect": st.column_config.NumberColumn("direct effect", format=_NUMBER),
            "attribution": st.column_config.NumberColumn(format=_NUMBER),
        },
    )
    st.caption(
        "Every head on every route edge, every FFN block on the route and its top neurons, "
        "strongest first; click a column to sort, select a row to highlight it in the graph. "
        "**direct effect**: the part written at the output position, projected through the "
        "final norm (scale frozen) onto unembed(target) − unembed(distractor); 0 elsewhere. "
        "**attribution**: activation × gradient of the logit difference (≈ what zero-ablating "
        "it would cost). **weight**: the head's per-head contribution to the edge (LLM-TT's "
        "normalization) or the FFN edge's weight. "
        f"**{tables.FLAG}**: weight below τ yet |direct effect| or |attribution| at least "
        f"{LARGE_EFFECT_SHARE:.0%} of |logit difference|. Weight is *proximity* (how much of the "
        "residual a part makes up), effect is what it does to the logit difference: a small "
        "write along unembed(target) − unembed(distractor) can matter more than a large one "
        "orthogonal to it."
    )
    flagged = int(view.table[tables.FLAG].sum()) if tables.FLAG in view.table else 0
    if flagged:
        st.info(
            f"{flagged} component(s) have a small route weight but a large effect (column "
            f"“{tables.FLAG}”): the route's τ does not keep them, yet they move the logit "
            "difference."
        )
