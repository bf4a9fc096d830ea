"""The "why A instead of B?" view: target vs distractor logits and the route's effect table.

The numbers are :func:`llm_flow.analyses.contrast.analyse_contrast`'s (direct logit attribution
through the frozen-scale final norm, and activation × gradient); this module lays them out.
Selecting a row of the table selects its attention edge or FFN block in the graph (``app.state``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from app import figures, state
from app.figures import display_token, markdown_text
from app.state import LoadedModel, Trace
from llm_flow.analyses.contrast import ContrastAnalysis, ContrastError
from llm_flow.engine.routes import Route

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


def prepare(
    trace: Trace, model: LoadedModel, route: Route, target: str, distractor: str
) -> ContrastView:
    """Analyse the contrast (cached) and apply a newly selected table row to the selection.

    Runs before the graph is drawn, so a row's highlight shows in the same run.
    """
    if not target and not distractor:
        return ContrastView()
    try:
        analysis = state.contrast_analysis(trace, model, route, target, distractor)
    except ContrastError as exc:
        return ContrastView(error=str(exc))
    table = figures.effect_table(analysis.frame(), trace.run.tokens)
    state.take_table_selection(figures.effect_ids(table), figures.effect_units(table))
    return ContrastView(analysis, table)


def _quoted(token: str) -> str:
    return f"“{markdown_text(display_token(token))}”"


def summary(view: ContrastView) -> None:
    """One line above the graph: the two logits and their difference (details below it), or
    why the tokens cannot be used."""
    if view.error is not None:
        message = markdown_text(view.error[0].upper() + view.error[1:].rstrip("."))
        st.error(
            f"{message}.  \nType one token each as target and distractor in the sidebar "
            "(words in mid-sentence usually start with a space, e.g. “ Mary”)."
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
        key=state.EFFECTS_TABLE,
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
        "normalization) or the FFN edge's weight."
    )
