"""The heads panel's "Why this source?" tab: the QK attribution of the selected attention edge
for one head (:func:`llm_flow.analyses.attend.attend`).

The pre-softmax score is split exactly over the parts the residual stream holds at the query
(query side) and at the source (key side); two bar charts show the largest, a table the largest
(query part, key part) pairs. A bar selects its part on the graph: the embedding or the
residual node a head wrote into (``A3_5`` for head ``A3_5.h2``), or the FFN block (``M4_5``, also
for its expert ``M4_5.e7``). A second view explains "s rather than the other sources": the score
minus the mean score of every other source the head sees from the query.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import streamlit as st

from app import cache, session
from app.cache import CachedTrace
from app.figures import panels as panel_figures
from app.selection import clicked
from llm_flow.analyses.attend import Attend, ScoreSplit, Term
from llm_flow.errors import LlmFlowError
from llm_flow.io.text import markdown_text, position_text

TOP_BARS = 12
TOP_PAIRS = 10
_COMPONENT = re.compile(r"^([XAM]\d+_\d+)(?:\.([he])(\d+))?$")
_VIEWS = ("the score", "s rather than the other sources")


def component_selection(component: str) -> tuple[str, int | None] | None:
    """The graph element a QK component names and its head or expert (the preferred unit), or
    None for ``bias`` and the ``position/softcap`` remainder, which no node writes."""
    match = _COMPONENT.match(component)
    if match is None:
        return None
    return match.group(1), int(match.group(3)) if match.group(3) else None


def _pick(key: str) -> None:
    """A bar was clicked: select its part (a callback, so the graph redraws at once)."""
    picked = clicked(st.session_state.get(key))
    target = component_selection(picked) if picked else None
    if target is not None:
        session.select_with_unit(*target)


def _bars(terms: Sequence[Term], title: str, key: str) -> None:
    shown = terms[:TOP_BARS]
    names = [t.component for t in shown]
    st.markdown(f"**{title}**")
    st.plotly_chart(
        panel_figures.score_terms_figure(
            names,
            [t.value for t in shown],
            [name if component_selection(name) else "" for name in names],
        ),
        key=key,
        on_select=lambda: _pick(key),
        selection_mode="points",
        config=panel_figures.PLOTLY_CONFIG,
    )


def _pairs(split: ScoreSplit) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "query part": [p.query_component for p in split.pairs[:TOP_PAIRS]],
            "key part": [p.key_component for p in split.pairs[:TOP_PAIRS]],
            "share of the score": [p.value for p in split.pairs[:TOP_PAIRS]],
        }
    )


def _summary(result: Attend, split: ScoreSplit, contrast: bool) -> str:
    what = (
        f"score minus the mean score of the {result.others} other sources"
        if contrast
        else "pre-softmax score q·k·scale"
    )
    text = (
        f"Head {result.head}'s {what}: **{split.score:.3f}** (attention "
        f"{result.attention:.3f}) = Σ terms {split.terms_sum:.3f}"
    )
    if not result.bilinear:
        text += f" + {split.remainder:.3f} from softcapping / ALiBi (not a product of parts)"
    return text + "."


def why_tab(cached: CachedTrace, layer: int, head: int | None, t: int, s: int, key: str) -> None:
    """The tab's content for the edge s → t of ``layer``; ``head`` None asks for a head."""
    if head is None:
        st.info("Choose a head above: the score is split for one head at a time.")
        return
    try:
        with st.spinner("Splitting the score over the residual's parts…"):
            result = cache.attend(cached, layer, head, t, s)
    except LlmFlowError as exc:
        st.warning(markdown_text(str(exc)))
        return
    contrast = result.contrast is not None and (
        st.radio("Explain", _VIEWS, horizontal=True, key=f"why_view|{key}") == _VIEWS[1]
    )
    split = result.contrast if contrast and result.contrast is not None else result.direct
    st.markdown(_summary(result, split, contrast))
    st.caption(
        f"Parts at the query ({position_text(t)}) times the key at the source ({position_text(s)}),"
        " and the query times the parts at the source. Norm scales are frozen at this run's, so "
        "the split is exact. Click a bar to select its part on the graph."
    )
    left, right = st.columns(2)
    with left:
        _bars(split.query_terms, "Query side (parts at the query)", f"why_q|{key}|{contrast}")
    with right:
        _bars(split.key_terms, "Key side (parts at the source)", f"why_k|{key}|{contrast}")
    st.markdown("**Largest pairs**")
    st.dataframe(_pairs(split), hide_index=True, width="stretch")
