"""The route tab: the model's prediction, the route graph with the panel of the clicked element
beside it, downloads, the "why A instead of B?" section and the interventions below.

The route is re-found from the cached trace on every run (milliseconds); the figure is the
core's (:func:`llm_flow.io.figure.flow_figure`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass

import plotly.graph_objects as go
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app import cache, session
from app.cache import ModelKey, TraceKey
from app.selection import parse_selection
from app.views import contrast, controls, interventions, loading, panels
from app.views.errors import NeedsInput
from llm_flow.analyses.contrast import ContrastAnalysis
from llm_flow.config import AppConfig
from llm_flow.engine.routes import Route, find_route
from llm_flow.engine.trace import Trace
from llm_flow.io.export import graph_json, to_graphml
from llm_flow.io.figure import flow_figure
from llm_flow.io.image import export_title, titled, to_image
from llm_flow.io.text import display_token, markdown_text, position_text

GRAPH_CONFIG = {
    "displaylogo": False,
    "scrollZoom": True,
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"],
    # The toolbar's camera button saves the figure client-side, so SVG export needs no kaleido.
    "toImageButtonOptions": {"format": "svg", "filename": "llm-flow-route"},
}


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

    settings = sidebar.settings
    route = find_route(traced.graph, [position], settings.threshold, settings.renormalize)
    # Before the selection is read: a newly selected table row selects its edge or block.
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
        prompt=prompt,
        position=position,
        threshold=settings.threshold,
        renormalize=settings.renormalize,
        normalize_lens=settings.normalize_lens,
        selection=selection,
        target=sidebar.target,
        distractor=sidebar.distractor,
    )

    graph_column, panel_column = st.columns([3, 2], gap="medium")
    with graph_column:
        _prediction(sidebar.model_label, traced, position)
        contrast.summary(contrast_view)
        st.caption(
            f"Route: {route.n_edges} edges at τ = {settings.threshold:.3f}"
            + (", renormalized" if settings.renormalize else "")
            + ". Edge width and opacity follow the weight. Drag to pan, scroll to zoom, "
            "double-click to reset."
        )
        figure = flow_figure(
            traced, route, position=position, selected=selection.id if selection else None
        )
        st.plotly_chart(
            figure,
            key=session.GRAPH,
            on_select=session.on_graph_select,
            selection_mode="points",
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
    with panel_column:
        panels.selection_panel(
            selection, panels.PanelContext(cached, route, settings.normalize_lens)
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
