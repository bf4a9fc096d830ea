"""The route graph, drawn by a Streamlit custom component (``st.components.v2``) that redraws a
τ step in the browser (issue 12).

The component (``route_graph.js``) draws the server's figure (:func:`llm_flow.io.figure.
flow_figure`) whenever the server's τ, selection or view changes, and, while the page's τ slider
moves, finds the route itself from :func:`app.figures.route_data.route_data` (sent once per
trace, position and renormalize setting) and redraws at once; the fragment's rerun then brings
the server's route to the panels. A click on the graph comes back as the component's
``clicked`` trigger and selects like a click on ``st.plotly_chart`` did.

plotly.js is the installed plotly package's own file, served by Streamlit as a static component
path (the app runs offline: no CDN).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go
import streamlit as st
import streamlit.components.v1 as components_v1

from app import session
from app.cache import TraceKey
from app.figures.route_data import data_floor, floor_route, route_data
from app.selection import Selection
from llm_flow.engine.trace import Trace

KEY = "route_graph"
_JS = (Path(__file__).with_name("route_graph.js")).read_text(encoding="utf-8")
# Session state: (trace/position/renormalize, its usual floor, floor, version, data), the last.
_CACHE = "_route_graph_data"

_component = st.components.v2.component("llm_flow_route_graph", js=_JS, isolate_styles=False)


def _plotly_js_url() -> str:
    """Where the browser loads plotly.min.js from: the plotly package's ``package_data``
    folder, served by Streamlit's static component route (declared on every run: a new
    runtime, e.g. a test's, must know the path too)."""
    folder = Path(plotly.__file__).parent / "package_data"
    declared = components_v1.declare_component("plotlyjs", path=str(folder))
    return f"component/{declared.name}/plotly.min.js"


def _selected(selection: Selection | None) -> dict[str, Any] | None:
    """The selection as the component draws its ring: an attention edge or a node."""
    if selection is None:
        return None
    if selection.source is not None:
        edge = [selection.layer, selection.token, selection.source]
        return {"edge": edge, "tokens": [selection.token, selection.source]}
    return {
        "kind": selection.node,
        "layer": selection.layer,
        "token": selection.token,
        "tokens": [selection.token],
    }


def _route_data(
    key: TraceKey,
    trace: Trace,
    position: int,
    renormalize: bool,
    threshold: float,
    steps: list[float],
) -> tuple[str, dict[str, Any]]:
    """(version, data) of the client's route search, recomputed only when the trace, position,
    renormalize setting or (below the usual floor) τ changes."""
    ss = st.session_state
    base = (repr(key), position, renormalize)
    held = ss.get(_CACHE)
    superset = None
    if held is not None and held[0] == base:
        default_floor = held[1]
    else:
        superset = floor_route(trace.graph, position, steps)  # seconds on a long prompt
        default_floor = superset.threshold
    floor = data_floor(default_floor, threshold)
    if held is not None and held[0] == base and held[2] == floor:
        return held[3], held[4]
    data = route_data(trace, position, renormalize, floor, superset)
    version = hashlib.sha1(repr((*base, floor)).encode()).hexdigest()[:16]
    ss[_CACHE] = (base, default_floor, floor, version, data)
    return version, data


def on_click() -> None:
    """The component's ``clicked`` trigger: select like a click on the plotly chart did."""
    state = st.session_state.get(KEY)  # the component's state and trigger values
    target = state.get("clicked") if isinstance(state, dict) else None
    if isinstance(target, str) and target:
        session.select_clicked(target)


def show(
    key: TraceKey,
    trace: Trace,
    figure: go.Figure,
    *,
    position: int,
    threshold: float,
    renormalize: bool,
    compact: bool,
    selection: Selection | None,
    steps: list[float],
    config: dict[str, Any],
) -> None:
    """Mount the route graph: ``figure`` is the server's picture at ``threshold``."""
    version, data = _route_data(key, trace, position, renormalize, threshold, steps)
    _component(
        key=KEY,
        data={
            "figure": figure.to_json(),
            "threshold": threshold,
            "compact": compact,
            "selected": _selected(selection),
            "version": version,
            "route": data,
            "config": config,
            "plotly_url": _plotly_js_url(),
        },
        on_clicked_change=on_click,
    )
