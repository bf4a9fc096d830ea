"""The route tab: the model's prediction, the route graph with the panel of the clicked element
beside it, downloads, the "why A instead of B?" section and the interventions below.

The route is re-found from the cached trace on every run (milliseconds); the figure is the
core's (:func:`llm_flow.io.figure.flow_figure`), drawn by :mod:`app.views.route_graph`, which
also redraws the route in the browser while the τ slider moves. Everything the threshold changes
is one ``st.fragment`` (:func:`route_view`) with the τ slider at its top, so a slider step or a
click on the graph reruns that part of the page only.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass, replace

import plotly.graph_objects as go
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app import cache, session
from app.cache import CachedTrace, LoadedModel, ModelKey, TraceKey
from app.selection import parse_selection
from app.views import contrast, controls, interventions, loading, panels, route_graph
from app.views.errors import NeedsInput
from llm_flow.analyses.contrast import ContrastAnalysis
from llm_flow.config import AppConfig
from llm_flow.engine.routes import DEFAULT_THRESHOLD, Route, find_route
from llm_flow.engine.trace import Trace
from llm_flow.io.export import graph_json, to_graphml
from llm_flow.io.figure import flow_figure
from llm_flow.io.image import export_title, titled, to_image
from llm_flow.io.layout import COMPACT_ABOVE
from llm_flow.io.text import display_token, markdown_text, position_text

GRAPH_CONFIG = {
    "displaylogo": False,
    # The wheel scrolls the page, as everywhere else on it; zoom is the toolbar's (issue 12).
    "scrollZoom": False,
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"],
    # The toolbar's camera button saves the figure client-side, so SVG export needs no kaleido.
    "toImageButtonOptions": {"format": "svg", "filename": "llm-flow-route"},
}
THRESHOLD_STEP = 0.005
THRESHOLD_STEPS = [
    round(i * THRESHOLD_STEP, 3) for i in range(round(session.THRESHOLD_MAX / THRESHOLD_STEP) + 1)
]


@dataclass(frozen=True)
class Sidebar:
    """What the sidebar chose, and where the route tab writes into it."""

    model_key: ModelKey
    model_label: str
    prompt: str | None
    settings: controls.GraphSettings
    target: str
    distractor: str
    info_slot: DeltaGenerator  # model info, once the model is loaded
    position_slot: DeltaGenerator  # the output position, once the prompt is traced


def route_tab(cfg: AppConfig, sidebar: Sidebar) -> None:
    """Graph, panel, contrast, ablation and faithfulness of the sidebar's model and prompt."""
    if sidebar.prompt is None:
        raise NeedsInput("There are no prompts yet: add one in the sidebar.")
    prompt = cfg.check_prompt(sidebar.prompt)
    model = loading.model(sidebar.model_key)
    with sidebar.info_slot:
        controls.model_info(model)
    cached = loading.trace(TraceKey(sidebar.model_key, prompt), model)
    traced = cached.trace
    session.start_view((sidebar.model_label, prompt), traced.n_tokens)
    with sidebar.position_slot:
        position = controls.position_control(cached)
    route_view(RouteView(cfg, sidebar, model, cached, prompt, position))


@dataclass(frozen=True)
class RouteView:
    """What the route view draws from: all fixed while only τ, the selection or the view's own
    widgets change."""

    cfg: AppConfig
    sidebar: Sidebar
    model: LoadedModel
    cached: CachedTrace
    prompt: str
    position: int


def graph_controls(n_tokens: int) -> float:
    """τ and the compact-view toggle, above the graph and inside its fragment (a slider in the
    sidebar would rerun the whole page on every step)."""
    st.session_state.setdefault(session.THRESHOLD, DEFAULT_THRESHOLD)  # a page that stopped early
    st.session_state.setdefault(session.COMPACT, n_tokens > COMPACT_ABOVE)
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    threshold: float = left.slider(
        "Threshold τ",
        min_value=0.0,
        max_value=session.THRESHOLD_MAX,
        step=THRESHOLD_STEP,
        format="%.3f",
        key=session.THRESHOLD,
        help="Edges whose contribution is below τ are pruned from the route.",
    )
    right.toggle(
        "Route tokens only",
        key=session.COMPACT,
        help="Columns only for the tokens the route touches; ⋯ marks hidden tokens (hover it "
        f"to see which). On by default for prompts over {COMPACT_ABOVE} tokens.",
    )
    return threshold


@st.fragment
def route_view(view: RouteView) -> None:
    """Everything τ changes: the graph with its panel, the contrast and the interventions.

    A fragment: a slider step, a click on the graph or a button here reruns only this function,
    not the sidebar, the trace lookup or the dataset tab.
    """
    if st.session_state.get(session.POSITION) != view.position:
        st.rerun()  # an output marker was clicked: the sidebar's position picker must follow
    cfg, sidebar, model, cached, position = (
        view.cfg,
        view.sidebar,
        view.model,
        view.cached,
        view.position,
    )
    traced = cached.trace
    settings = replace(sidebar.settings, threshold=graph_controls(traced.n_tokens))
    if session.dataset_drawn_at() not in (None, settings.threshold):
        st.rerun()  # the dataset tab (outside this fragment) shows tables: mark them stale
    with st.spinner(f"Finding the route at τ = {settings.threshold:.3f}…"):
        route = find_route(traced.graph, [position], settings.threshold, settings.renormalize)
    # Before the selection is read: a newly selected table row selects its edge or block.
    with st.spinner("Why A instead of B? Computing the effect table (one backward pass)…"):
        contrast_view = contrast.prepare(cached, route, sidebar.target, sidebar.distractor)
    chosen = session.selection()
    selection = parse_selection(chosen, traced.n_layers, traced.n_tokens)
    if chosen and selection is None:
        st.warning(
            markdown_text(f"{chosen!r} is not part of this graph; the selection was cleared.")
        )
        session.select(None)

    session.write_url(
        model=sidebar.model_label,
        device=sidebar.model_key.device,
        dtype=sidebar.model_key.dtype,
        prompt=view.prompt,
        position=position,
        threshold=settings.threshold,
        renormalize=settings.renormalize,
        normalize_lens=settings.normalize_lens,
        selection=selection,
        target=sidebar.target,
        distractor=sidebar.distractor,
    )

    graph_column, panel_column = st.columns([3, 2], gap="medium")
    # The panel first: the page shows each element as it arrives, and drawing the graph is the
    # browser's slowest step, so a click's panel is not kept waiting behind it.
    with panel_column, st.spinner("Computing the panel…"):
        panels.selection_panel(
            selection,
            panels.PanelContext(cfg, cached, route, settings.normalize_lens, contrast_view.pair),
        )
    with graph_column:
        _prediction(sidebar.model_label, traced, position)
        contrast.summary(contrast_view)
        st.caption(
            f"Route: {route.n_edges} edges at τ = {settings.threshold:.3f}"
            + (", renormalized" if settings.renormalize else "")
            + ". Edge width and opacity follow the weight. Drag to pan; zoom with the "
            "toolbar's buttons; double-click to reset."
        )
        figure = flow_figure(
            traced,
            route,
            position=position,
            selected=selection.id if selection else None,
            compact=bool(st.session_state.get(session.COMPACT)),
        )
        route_graph.show(
            TraceKey(sidebar.model_key, view.prompt),
            traced,
            figure,
            position=position,
            threshold=settings.threshold,
            renormalize=settings.renormalize,
            compact=bool(st.session_state.get(session.COMPACT)),
            selection=selection,
            steps=THRESHOLD_STEPS,
            config=GRAPH_CONFIG,
        )
        title = export_title(
            sidebar.model_label,
            traced.tokens,
            threshold=settings.threshold,
            renormalize=settings.renormalize,
            position=position,
        )
        _downloads(traced, route, position, figure, title, contrast_view.analysis)
        if cfg.debug:
            store = cache.store()
            st.caption(
                f"trace {cached.seconds:.2f} s · load {model.load_seconds:.1f} s · "
                f"cached models {len(store.models)}, traces {len(store.traces)}"
            )
    contrast.contrast_section(contrast_view)
    interventions.section(
        interventions.Context(
            cfg,
            sidebar.model_key,
            model,
            cached,
            position,
            settings.threshold,
            settings.renormalize,
            selection,
            contrast_view.pair,
        )
    )


def _prediction(model_label: str, traced: Trace, position: int) -> None:
    prediction = traced.prediction(position)
    st.markdown(
        f"**{markdown_text(model_label)}** predicts "
        f"**“{markdown_text(display_token(prediction.token))}”** "
        f"(p = {prediction.prob:.2f}) after "
        f"“{markdown_text(display_token(traced.tokens[position]))}” "
        f"({position_text(position, traced.n_tokens)})"
    )


def route_export(
    traced: Trace, route: Route, position: int, analysis: ContrastAnalysis | None
) -> dict[str, object]:
    """The app's graph JSON: exactly ``llm-flow graph --format json --heads`` of the same
    settings, with the contrast block and direct effects when a target/distractor is set."""
    return graph_json(
        traced,
        route,
        position=position,
        heads=True,
        contrast=None if analysis is None else analysis.contrast,
        direct=None if analysis is None else analysis.direct,
    )


def _image(figure: go.Figure, title: str, fmt: str) -> bytes:
    return to_image(titled(figure, title), fmt)


def _downloads(
    traced: Trace,
    route: Route,
    position: int,
    figure: go.Figure,
    title: str,
    analysis: ContrastAnalysis | None,
) -> None:
    """Graph as JSON/GraphML (the CLI's contract, per-head weights and contrast included) and
    the figure with a title saying model, prompt, τ and position; built only when clicked."""

    def data() -> dict[str, object]:
        return route_export(traced, route, position, analysis)

    static = importlib.util.find_spec("kaleido") is not None
    columns = st.columns(5 if static else 3)
    columns[0].download_button(
        "Graph JSON",
        data=lambda: json.dumps(data(), indent=1),
        file_name="llm-flow-route.json",
        mime="application/json",
        on_click="ignore",
        key="download_json",
    )
    columns[1].download_button(
        "Graph GraphML",
        data=lambda: to_graphml(data()),
        file_name="llm-flow-route.graphml",
        mime="application/xml",
        on_click="ignore",
        key="download_graphml",
    )
    columns[2].download_button(
        "Figure HTML",
        data=lambda: titled(figure, title).to_html(include_plotlyjs=True, full_html=True),
        file_name="llm-flow-route.html",
        mime="text/html",
        on_click="ignore",
        key="download_html",
        help="Interactive, works offline.",
    )
    if not static:
        st.caption(
            "PNG/SVG with a title: install kaleido (pip install 'kaleido>=1'; it uses the "
            "system Chromium). The figure's camera button saves an untitled SVG."
        )
        return
    for column, fmt, mime in (
        (columns[3], "png", "image/png"),
        (columns[4], "svg", "image/svg+xml"),
    ):
        column.download_button(
            f"Figure {fmt.upper()}",
            data=functools.partial(_image, figure, title, fmt),
            file_name=f"llm-flow-route.{fmt}",
            mime=mime,
            on_click="ignore",
            key=f"download_{fmt}",
        )
