"""The plotly picture of a route (the app's graph, ``Route.figure()``) and of a route diff.

Pure functions from a trace's route to a ``go.Figure``: no Streamlit, so a figure can be checked
in a unit test and shown in Jupyter alike. Where everything sits is :mod:`llm_flow.io.layout`.

Each edge kind has its own colour and shape, so they stay apart where they share endpoints:
residual edges are vertical lines, the s = t attention edge bows to the left of them, and the
FFN path bends right through its block square ``M{l}_t``. Edge widths and opacities grow with
the route's weights. Prompts longer than :data:`~llm_flow.io.layout.COMPACT_ABOVE` tokens open on
the route's tokens only (:func:`route_columns`), hidden runs of tokens marked by gaps.
Plotly cannot click a line, so every edge carries an invisible marker whose
``customdata`` names what a click selects (:mod:`llm_flow.engine.nodes`: a residual edge selects
the node it leads to); an output marker's is ``pos:t`` (:func:`parse_position`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import plotly.graph_objects as go
import torch

from llm_flow.analyses.route_diff import DEFAULT_FACTOR, STATUSES, RouteDiff, Shift
from llm_flow.engine.nodes import (
    Node,
    attention_edge_id,
    node_id,
    parse_attention_edge,
    parse_node,
)
from llm_flow.engine.routes import Route
from llm_flow.engine.trace import Prediction, Trace
from llm_flow.errors import InputError
from llm_flow.io import layout, plot
from llm_flow.io import route_shapes as shapes
from llm_flow.io.text import plotly_text

# The faint off-route node grid is skipped on big pictures: a browser draws every point again
# on each slider step (2,400 grid points of a 40-column view cost ~0.2 s on a 2-core machine).
MAX_GRID_NODES = 2_500
MAX_SOURCE_LABELS = 60  # "← s" labels of edges from sources left of the opening window
POSITION_PREFIX = "pos:"  # customdata of the output markers: ``pos:t`` chooses position t


def parse_position(text: str) -> int | None:
    """The position of an output marker's ``pos:t``, else ``None``."""
    if not text.startswith(POSITION_PREFIX):
        return None
    digits = text.removeprefix(POSITION_PREFIX)
    return int(digits) if digits.isdigit() else None


# -- columns ----------------------------------------------------------------------------------


def route_tokens(route: Route) -> np.ndarray:
    """The token positions a route touches (a node of theirs is on it), ascending."""
    touched = route.embeddings | route.after_attention.any(0) | route.after_layer.any(0)
    return touched.nonzero().flatten().numpy()


def route_columns(
    route: Route, position: int, selected: str | None = None, compact: bool | None = None
) -> layout.Columns:
    """The picture's columns: every token, or (``compact``; by default for prompts longer than
    :data:`~llm_flow.io.layout.COMPACT_ABOVE`) only the route's tokens, the output
    ``position``'s and the ``selected`` element's."""
    n = route.graph.n_tokens
    if not (n > layout.COMPACT_ABOVE if compact is None else compact):
        return layout.all_columns(n)
    shown = {*route_tokens(route).tolist(), position % n}
    if selected is not None:
        edge = parse_attention_edge(selected)
        node = parse_node(selected) if edge is None else None
        picked = [edge[1], edge[2]] if edge is not None else [node.token] if node else []
        shown.update(t for t in picked if 0 <= t < n)
    return layout.compact_columns(shown, n)


# -- the flow graph ---------------------------------------------------------------------------


def flow_figure(
    trace: Trace,
    route: Route,
    *,
    position: int,
    selected: str | None = None,
    compact: bool | None = None,
) -> go.Figure:
    """The layer × token route graph with clickable edges, blocks, nodes and output markers.

    ``route`` is a route of ``trace``'s graph; the output marker of ``position`` is drawn large
    with its prediction (every marker's prediction shows on hover). ``selected`` (a node or
    attention edge id) gets a red ring; :class:`~llm_flow.errors.InputError` when it names
    nothing in this graph. ``compact`` shows only the route's tokens (:func:`route_columns`;
    ``None``: for prompts longer than :data:`~llm_flow.io.layout.COMPACT_ABOVE` tokens).
    """
    graph, tokens = trace.graph, trace.tokens
    if selected is not None:
        _check_selected(selected, graph.n_layers, graph.n_tokens)
    cols = route_columns(route, position, selected, compact)
    traces: list[go.Scatter] = []

    # Off-route nodes: a faint grid, so the picture keeps its shape and any node can be read.
    if 2 * graph.n_layers * len(cols.tokens) <= MAX_GRID_NODES:
        xs, ys, ids, texts = shapes.residual_nodes(route, tokens, on_route=False, cols=cols)
        grid = {"size": 4, "color": plot.NODE_COLOUR, "symbol": "circle", "opacity": 0.3}
        traces.append(
            plot.markers(
                xs, ys, ids, texts, group="nodes", marker=grid, name="residual (off route)"
            )
        )

    attention, att_idx = shapes.attention_edges(route, cols)
    for name, group, rgb, edges in (
        ("residual", "residual", plot.RESIDUAL_RGB, shapes.residual_edges(route, cols)),
        ("FFN", "ffn", plot.FFN_RGB, shapes.ffn_edges(route, cols)),
        ("attention", "attention", plot.ATTENTION_RGB, attention),
    ):
        traces.append(plot.legend_entry(name, group, plot.css_rgb(rgb)))
        traces += plot.line_traces(edges, rgb, group)
    traces.append(_attention_handles(tokens, attention.weights, att_idx, cols))
    traces += _offscreen_sources(attention, att_idx, tokens, cols, position)

    # FFN blocks on the route: small squares that select the neuron panel.
    layers, positions = shapes.mask_columns(route.ffn)
    ffn_weights = route.ffn_weights[route.ffn].tolist()
    pairs = list(zip(layers.tolist(), positions.tolist(), strict=True))
    square = {"size": 8, "color": plot.css_rgb(plot.FFN_RGB), "symbol": "square"}
    traces.append(
        plot.markers(
            layout.node_x("M", cols.of(positions)).tolist(),
            layout.node_y("M", layers).tolist(),
            [node_id("M", layer, t) for layer, t in pairs],
            [
                f"{shapes.node_text('M', layer, t, tokens)}<br>weight {w:.3f}"
                for (layer, t), w in zip(pairs, ffn_weights, strict=True)
            ],
            group="ffn",
            marker=square,
            name="FFN block",
        )
    )
    traces += shapes.route_nodes(
        route, tokens, cols, name="residual node", sizes=(5, 8), legend=True
    )
    traces.append(_output_row(graph.n_layers, tokens, trace.predictions, position, cols))
    if selected is not None:
        traces += _highlight(selected, cols)
    return plot.graph_figure(traces, tokens, graph.n_layers, position, cols)


def _attention_handles(
    tokens: Sequence[str], att_weights: np.ndarray, att_idx: np.ndarray, cols: layout.Columns
) -> go.Scatter:
    """Click handles of attention edges (select the edge). Residual edges have none: a node
    names the weight of the residual edge into it, and a click on it selects it."""
    hx, hy = layout.attention_handles(att_idx[:, 0], cols.of(att_idx[:, 1]), cols.of(att_idx[:, 2]))
    rows = list(zip(att_idx.tolist(), att_weights.tolist(), strict=True))
    return plot.handles(
        hx.tolist(),
        hy.tolist(),
        [attention_edge_id(layer, t, s) for (layer, t, s), _ in rows],
        [
            f"{shapes.attention_text('<b>attention</b>', layer, t, s, tokens)}, weight {w:.3f}"
            for (layer, t, s), w in rows
        ],
        "attention",
    )


def _offscreen_sources(
    attention: plot.Edges,
    att_idx: np.ndarray,
    tokens: Sequence[str],
    cols: layout.Columns,
    position: int,
) -> list[go.Scatter]:
    """Where the figure opens on a window (a long prompt's full view), an attention edge from a
    source left of it is labelled "← s" where it enters the window (on the edge itself, so the
    label stays right when the view is panned); the strongest :data:`MAX_SOURCE_LABELS`."""
    low, _ = layout.x_window(cols, position)
    if cols.compact or low <= 0 or len(att_idx) == 0:
        return []
    at = low + 0.35
    y = layout.crossing_y(attention.points, at)
    rows = np.flatnonzero((cols.of(att_idx[:, 2]) < at) & ~np.isnan(y))
    rows = rows[np.argsort(-attention.weights[rows])][:MAX_SOURCE_LABELS]
    if len(rows) == 0:
        return []
    texts = [
        shapes.attention_text("<b>from off screen</b>", layer, t, s, tokens)
        for layer, t, s in att_idx[rows].tolist()
    ]
    return [
        go.Scatter(
            x=[at] * len(rows),
            y=y[rows],
            mode="text",
            text=[f"←{s}" for s in att_idx[rows, 2].tolist()],
            textposition="middle right",
            textfont={"size": 10, "color": plot.css_rgb(plot.ATTENTION_RGB)},
            hovertext=texts,
            hovertemplate="%{hovertext}<extra></extra>",
            name="off-screen sources",
            showlegend=False,
        )
    ]


def _output_row(
    n_layers: int,
    tokens: Sequence[str],
    predictions: Sequence[Prediction],
    position: int,
    cols: layout.Columns,
) -> go.Scatter:
    """Markers above every column: a click makes that token the output position."""
    shown = cols.tokens
    texts = [
        f"<b>output position {t}</b> after {plotly_text(tokens[t])}<br>"
        f"predicts {plotly_text(predictions[t].token)} (p = {predictions[t].prob:.2f})"
        "<br>click to draw its route"
        for t in shown
    ]
    chosen = [t == position for t in shown]
    return go.Scatter(
        x=cols.of(list(shown)).tolist(),
        y=[layout.output_y(n_layers)] * len(shown),
        mode="markers+text",
        marker={
            "symbol": "triangle-down",
            "size": [15 if c else 10 for c in chosen],
            "color": [plot.HIGHLIGHT if c else plot.NODE_COLOUR for c in chosen],
        },
        # " ", not "": plotly.js drops the text element of an empty text and never adds it
        # back to that point, so a later redraw choosing the point would show no prediction.
        text=[
            plotly_text(predictions[t].token) if c else " "
            for t, c in zip(shown, chosen, strict=True)
        ],
        textposition="top center",
        textfont={"color": plot.HIGHLIGHT},
        customdata=[f"{POSITION_PREFIX}{t}" for t in shown],
        hovertext=texts,
        hovertemplate="%{hovertext}<extra></extra>",
        name="output position",
        showlegend=False,
        selected={"marker": {"opacity": 1}},
        unselected={"marker": {"opacity": 1}},
        cliponaxis=False,
    )


def _check_selected(selected: str, n_layers: int, n_tokens: int) -> None:
    edge = parse_attention_edge(selected)
    node = parse_node(selected) if edge is None else Node("A", edge[0], edge[1])
    if node is None or node.layer >= n_layers or node.token >= n_tokens:
        raise InputError(
            f"{selected!r} is not a node or attention edge of this graph ({n_layers} layers, "
            f"{n_tokens} tokens); name one like X0_0, M0_0 or X0_0->A0_0"
        )


def _highlight(selected: str, cols: layout.Columns) -> list[go.Scatter]:
    """A red ring on the selected node or block; an attention edge is traced by a red line with
    a ring on each end (one ring on the bow of an s = t edge): a ring at the click handle of a
    long edge sat on a third token's column. ``selected`` is checked (:func:`_check_selected`)
    and its tokens are shown columns."""
    edge = parse_attention_edge(selected)
    node = parse_node(selected) if edge is None else Node("A", edge[0], edge[1])
    assert node is not None  # checked by _check_selected
    traces: list[go.Scatter] = []
    if edge is not None:
        layer, t, s = edge
        points = layout.attention_points(layer, cols.of(t), cols.of(s))[0]  # [3, 2]
        traces.append(
            go.Scatter(
                x=points[:, 0],
                y=points[:, 1],
                mode="lines",
                line={"color": plot.HIGHLIGHT, "width": 3, "dash": "dot"},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        if t == s:
            x, y = layout.attention_handles(layer, cols.of(t), cols.of(s))
        else:
            x, y = points[[0, -1], 0], points[[0, -1], 1]
    else:
        x, y = layout.node_x(node.kind, cols.of(node.token)), layout.node_y(node.kind, node.layer)
    ring = {
        "symbol": "circle-open",
        "size": 18,
        "color": plot.HIGHLIGHT,
        "line": {"width": 3, "color": plot.HIGHLIGHT},
    }
    traces.append(
        go.Scatter(x=x, y=y, mode="markers", marker=ring, hoverinfo="skip", showlegend=False)
    )
    return traces


# -- the route diff ---------------------------------------------------------------------------


def _kept_lines(kept: dict[Shift, Route], factor: float, cols: layout.Columns) -> list[go.Scatter]:
    """Kept edges coloured by their change on a diverging scale, one legend entry per class."""
    words = {
        "weakened": f"kept, weakened ≥ {factor:g}×",
        "similar": "kept, similar",
        "strengthened": f"kept, strengthened ≥ {factor:g}×",
    }
    traces: list[go.Scatter] = []
    for shift, route in kept.items():
        rgb = plot.SHIFT_RGB[shift]
        group = f"kept-{shift}"
        legend = f"{words[shift]} ({route.n_edges})"
        traces.append(plot.legend_entry(legend, group, plot.css_rgb(rgb)))
        lines = (shapes.residual_edges(route, cols), shapes.ffn_edges(route, cols))
        for edges in (*lines, shapes.attention_edges(route, cols)[0]):
            traces += plot.line_traces(edges, rgb, group)
    return traces


def diff_figure(diff: RouteDiff, *, position: int, factor: float = DEFAULT_FACTOR) -> go.Figure:
    """The routes before and after an intervention in one picture: edges only before red
    (lost), only after green (gained), edges on both on a diverging scale by their change
    (weakened / similar / strengthened by ``factor``); widths follow the weight on the
    route each edge is on (kept edges: after). Hover an attention edge or an FFN block for its
    weights before → after."""
    before, after = diff.before, diff.after
    graph = before.graph
    tokens = graph.tokens
    union = replace(
        after,
        embeddings=before.embeddings | after.embeddings,
        after_attention=before.after_attention | after.after_attention,
        after_layer=before.after_layer | after.after_layer,
    )
    cols = layout.all_columns(graph.n_tokens)
    traces: list[go.Scatter] = shapes.route_nodes(union, tokens, cols, name="node", sizes=(4, 6))
    hx: list[float] = []
    hy: list[float] = []
    htext: list[str] = []
    kept = diff.kept_by_shift(factor)
    for status in STATUSES:
        part = diff.part(status)
        rgb = plot.DIFF_RGB[status]
        if status == "kept":
            traces += _kept_lines(kept, factor, cols)
        else:
            legend = f"{status} ({part.n_edges})"
            traces.append(plot.legend_entry(legend, status, plot.css_rgb(rgb)))
        attention, idx = shapes.attention_edges(part, cols)
        if status != "kept":
            for edges in (
                shapes.residual_edges(part, cols),
                shapes.ffn_edges(part, cols),
                attention,
            ):
                traces += plot.line_traces(edges, rgb, status)
        x, y = layout.attention_handles(idx[:, 0], idx[:, 1], idx[:, 2])
        hx += x.tolist()
        hy += y.tolist()
        idx_t = torch.from_numpy(idx)
        was_now = zip(
            before.attention_weights_at(idx_t).tolist(),
            after.attention_weights_at(idx_t).tolist(),
            strict=True,
        )
        for (layer, t, s), (was, now) in zip(idx.tolist(), was_now, strict=True):
            htext.append(
                f"{shapes.attention_text(f'<b>{status}</b> attention', layer, t, s, tokens)}<br>"
                f"weight {was:.3f} → {now:.3f}"
            )
        layers, positions = shapes.mask_columns(part.ffn)
        hx += layout.node_x("M", positions).tolist()
        hy += layout.node_y("M", layers).tolist()
        blocks = (r.ffn_weights[part.ffn].tolist() for r in (before, after))
        for layer, t, was, now in zip(layers.tolist(), positions.tolist(), *blocks, strict=True):
            htext.append(
                f"<b>{status}</b> {shapes.node_text('M', layer, t, tokens)}<br>"
                f"weight {was:.3f} → {now:.3f}"
            )
    traces.append(plot.handles(hx, hy, [""] * len(hx), htext, "handles"))
    return plot.graph_figure(traces, tokens, graph.n_layers, position)
