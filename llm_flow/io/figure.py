"""The plotly picture of a route (the app's graph, ``Route.figure()``) and of a route diff.

Pure functions from a trace's route to a ``go.Figure``: no Streamlit, so a figure can be checked
in a unit test and shown in Jupyter alike. Where everything sits is :mod:`llm_flow.io.layout`.

Each edge kind has its own colour and shape, so they stay apart where they share endpoints:
residual edges are vertical lines, the s = t attention edge bows to the left of them, and the
FFN path bends right through its block square ``M{l}_t``. Edge widths and opacities grow with
the route's weights. Plotly cannot click a line, so every edge carries an invisible marker whose
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
    NODE_WORDS,
    Node,
    NodeKind,
    attention_edge_id,
    node_id,
    parse_attention_edge,
    parse_node,
    source_id,
)
from llm_flow.engine.routes import Route
from llm_flow.engine.trace import Prediction, Trace
from llm_flow.errors import InputError
from llm_flow.io import layout, plot
from llm_flow.io.text import plotly_text

MAX_GRID_NODES = 20_000  # the faint off-route node grid is skipped on huge graphs
POSITION_PREFIX = "pos:"  # customdata of the output markers: ``pos:t`` chooses position t


def parse_position(text: str) -> int | None:
    """The position of an output marker's ``pos:t``, else ``None``."""
    if not text.startswith(POSITION_PREFIX):
        return None
    digits = text.removeprefix(POSITION_PREFIX)
    return int(digits) if digits.isdigit() else None


# -- edges ------------------------------------------------------------------------------------


def _columns(mask: torch.Tensor) -> list[np.ndarray]:
    """The index columns of a mask's set cells, e.g. (layer [E], token [E])."""
    idx = mask.nonzero().numpy()
    return [idx[:, i] for i in range(idx.shape[1])]


def _attention_edges(route: Route) -> tuple[plot.Edges, np.ndarray]:
    """Attention edges on the route as polylines, and their (layer, t, s) rows [E, 3]."""
    idx_t, weights = route.attention_edges()  # idx rows: (layer, target t, source s)
    idx = idx_t.numpy()
    points = layout.attention_points(idx[:, 0], idx[:, 1], idx[:, 2])
    return plot.Edges(points, weights.numpy()), idx


def _residual_parts(
    route: Route,
) -> tuple[tuple[layout.ResidualTarget, torch.Tensor, torch.Tensor], ...]:
    """(the node kind they lead to, mask [L, T], weights [L, T]) of both kinds of residual edge:
    into ``A{l}_t`` and into ``I{l}_t``."""
    return (
        ("A", route.attn_residual, route.attn_residual_weights),
        ("I", route.ffn_residual, route.ffn_residual_weights),
    )


def _residual_edges(route: Route) -> plot.Edges:
    """Both kinds of residual edge on the route as vertical lines."""
    parts = _residual_parts(route)
    points = [layout.residual_points(into, *_columns(mask)) for into, mask, _ in parts]
    weights = [w[mask].numpy() for _, mask, w in parts]
    return plot.Edges(np.concatenate(points), np.concatenate(weights))


def _ffn_edges(route: Route) -> plot.Edges:
    """``A{l}_t → M{l}_t → I{l}_t``, one bent polyline per FFN block on the route."""
    points = layout.ffn_points(*_columns(route.ffn))
    return plot.Edges(points, route.ffn_weights[route.ffn].numpy())


# -- markers ----------------------------------------------------------------------------------


def _node_text(kind: NodeKind, layer: int, t: int, tokens: Sequence[str]) -> str:
    where = "" if kind == "X" else f"layer {layer} · "
    return (
        f"<b>{node_id(kind, layer, t)}</b> {where}{NODE_WORDS[kind]}<br>"
        f"token {t}: {plotly_text(tokens[t])}"
    )


def _residual_nodes(
    route: Route, tokens: Sequence[str], on_route: bool
) -> tuple[list[float], list[float], list[str], list[str]]:
    """Coordinates, ids and hover texts of the residual nodes on (or off) the route."""
    xs: list[float] = []
    ys: list[float] = []
    ids: list[str] = []
    texts: list[str] = []
    masks: tuple[tuple[NodeKind, torch.Tensor], ...] = (
        ("X", route.embeddings[None, :]),
        ("A", route.after_attention),
        ("I", route.after_layer),
    )
    for kind, mask in masks:
        layers, positions = _columns(mask if on_route else ~mask)
        xs += layout.node_x(kind, positions).tolist()
        ys += layout.node_y(kind, layers).tolist()
        for layer, t in zip(layers.tolist(), positions.tolist(), strict=True):
            ids.append(node_id(kind, layer, t))
            texts.append(_node_text(kind, layer, t, tokens))
    return xs, ys, ids, texts


def _route_nodes(
    route: Route, tokens: Sequence[str], *, name: str, sizes: tuple[int, int], legend: bool = False
) -> go.Scatter:
    """The residual nodes on ``route``; ``sizes`` = (after attention, other): after-attention
    nodes smaller, so a column reads as layers, not a bead chain."""
    xs, ys, ids, texts = _residual_nodes(route, tokens, on_route=True)
    sizes_of = [sizes[0] if i.startswith("A") else sizes[1] for i in ids]
    marker: dict[str, object] = {"size": sizes_of, "color": plot.NODE_COLOUR, "symbol": "circle"}
    return plot.markers(
        xs, ys, ids, texts, group="nodes", marker=marker, name=name, showlegend=legend
    )


def _attention_text(title: str, layer: int, t: int, s: int, tokens: Sequence[str]) -> str:
    """Hover text of attention edge s → t of ``layer``, after ``title`` (markup allowed)."""
    return (
        f"{title} {source_id(layer, s)} → {node_id('A', layer, t)}<br>"
        f"{plotly_text(tokens[s])} → {plotly_text(tokens[t])}"
    )


# -- the flow graph ---------------------------------------------------------------------------


def flow_figure(
    trace: Trace, route: Route, *, position: int, selected: str | None = None
) -> go.Figure:
    """The layer × token route graph with clickable edges, blocks, nodes and output markers.

    ``route`` is a route of ``trace``'s graph; the output marker of ``position`` is drawn large
    with its prediction (every marker's prediction shows on hover). ``selected`` (a node or
    attention edge id) gets a red ring; :class:`~llm_flow.errors.InputError` when it names
    nothing in this graph.
    """
    graph, tokens = trace.graph, trace.tokens
    traces: list[go.Scatter] = []

    # Off-route nodes: a faint grid, so the picture keeps its shape and any node can be read.
    if 2 * graph.n_layers * graph.n_tokens <= MAX_GRID_NODES:
        xs, ys, ids, texts = _residual_nodes(route, tokens, on_route=False)
        grid = {"size": 4, "color": plot.NODE_COLOUR, "symbol": "circle", "opacity": 0.3}
        traces.append(
            plot.markers(
                xs, ys, ids, texts, group="nodes", marker=grid, name="residual (off route)"
            )
        )

    attention, att_idx = _attention_edges(route)
    for name, group, rgb, edges in (
        ("residual", "residual", plot.RESIDUAL_RGB, _residual_edges(route)),
        ("FFN", "ffn", plot.FFN_RGB, _ffn_edges(route)),
        ("attention", "attention", plot.ATTENTION_RGB, attention),
    ):
        traces.append(plot.legend_entry(name, group, plot.css_rgb(rgb)))
        traces += plot.line_traces(edges, rgb, group)
    traces += _edge_handles(route, tokens, attention.weights, att_idx)

    # FFN blocks on the route: small squares that select the neuron panel.
    layers, positions = _columns(route.ffn)
    ffn_weights = route.ffn_weights[route.ffn].tolist()
    pairs = list(zip(layers.tolist(), positions.tolist(), strict=True))
    square = {"size": 8, "color": plot.css_rgb(plot.FFN_RGB), "symbol": "square"}
    traces.append(
        plot.markers(
            layout.node_x("M", positions).tolist(),
            layout.node_y("M", layers).tolist(),
            [node_id("M", layer, t) for layer, t in pairs],
            [
                f"{_node_text('M', layer, t, tokens)}<br>weight {w:.3f}"
                for (layer, t), w in zip(pairs, ffn_weights, strict=True)
            ],
            group="ffn",
            marker=square,
            name="FFN block",
        )
    )
    traces.append(_route_nodes(route, tokens, name="residual node", sizes=(5, 8), legend=True))
    traces.append(_output_row(graph.n_layers, tokens, trace.predictions, position))
    if selected is not None:
        traces += _highlight(selected, graph.n_layers, graph.n_tokens)
    return plot.graph_figure(traces, tokens, graph.n_layers, position)


def _edge_handles(
    route: Route, tokens: Sequence[str], att_weights: np.ndarray, att_idx: np.ndarray
) -> list[go.Scatter]:
    """Click handles of attention edges (select the edge) and of residual edges (select the
    node they lead to)."""
    hx, hy = layout.attention_handles(att_idx[:, 0], att_idx[:, 1], att_idx[:, 2])
    rows = list(zip(att_idx.tolist(), att_weights.tolist(), strict=True))
    attention = plot.handles(
        hx.tolist(),
        hy.tolist(),
        [attention_edge_id(layer, t, s) for (layer, t, s), _ in rows],
        [
            f"{_attention_text('<b>attention</b>', layer, t, s, tokens)}, weight {w:.3f}"
            for (layer, t, s), w in rows
        ],
        "attention",
    )
    rx: list[float] = []
    ry: list[float] = []
    rid: list[str] = []
    rtext: list[str] = []
    for into, mask, weights in _residual_parts(route):
        layers, positions = _columns(mask)
        x, y = layout.residual_handles(into, layers, positions)
        rx += x.tolist()
        ry += y.tolist()
        pairs = zip(layers.tolist(), positions.tolist(), weights[mask].tolist(), strict=True)
        for layer, t, weight in pairs:
            rid.append(node_id(into, layer, t))
            rtext.append(
                f"<b>residual</b> → {node_id(into, layer, t)}<br>"
                f"token {t}: {plotly_text(tokens[t])}, weight {weight:.3f}"
            )
    return [attention, plot.handles(rx, ry, rid, rtext, "residual", size=9)]


def _output_row(
    n_layers: int, tokens: Sequence[str], predictions: Sequence[Prediction], position: int
) -> go.Scatter:
    """Markers above every column: a click makes that token the output position."""
    n = len(tokens)
    texts = [
        f"<b>output position {t}</b> after {plotly_text(tokens[t])}<br>"
        f"predicts {plotly_text(predictions[t].token)} (p = {predictions[t].prob:.2f})"
        "<br>click to draw its route"
        for t in range(n)
    ]
    chosen = [t == position for t in range(n)]
    return go.Scatter(
        x=list(range(n)),
        y=[layout.output_y(n_layers)] * n,
        mode="markers+text",
        marker={
            "symbol": "triangle-down",
            "size": [15 if c else 10 for c in chosen],
            "color": [plot.HIGHLIGHT if c else plot.NODE_COLOUR for c in chosen],
        },
        text=[plotly_text(predictions[t].token) if chosen[t] else "" for t in range(n)],
        textposition="top center",
        textfont={"color": plot.HIGHLIGHT},
        customdata=[f"{POSITION_PREFIX}{t}" for t in range(n)],
        hovertext=texts,
        hovertemplate="%{hovertext}<extra></extra>",
        name="output position",
        showlegend=False,
        selected={"marker": {"opacity": 1}},
        unselected={"marker": {"opacity": 1}},
        cliponaxis=False,
    )


def _highlight(selected: str, n_layers: int, n_tokens: int) -> list[go.Scatter]:
    """A red ring on the selected node, block or edge handle (and a red line along an edge)."""
    edge = parse_attention_edge(selected)
    node = parse_node(selected) if edge is None else Node("A", edge[0], edge[1])
    if node is None or node.layer >= n_layers or node.token >= n_tokens:
        raise InputError(
            f"{selected!r} is not a node or attention edge of this graph ({n_layers} layers, "
            f"{n_tokens} tokens); name one like X0_0, M0_0 or X0_0->A0_0"
        )
    traces: list[go.Scatter] = []
    if edge is not None:
        points = layout.attention_points(*edge)[0]  # [3, 2]
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
        x, y = layout.attention_handles(*edge)
    else:
        x, y = layout.node_x(node.kind, node.token), layout.node_y(node.kind, node.layer)
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


def _kept_lines(kept: dict[Shift, Route], factor: float) -> list[go.Scatter]:
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
        for edges in (_residual_edges(route), _ffn_edges(route), _attention_edges(route)[0]):
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
    traces: list[go.Scatter] = [_route_nodes(union, tokens, name="node", sizes=(4, 6))]
    hx: list[float] = []
    hy: list[float] = []
    htext: list[str] = []
    kept = diff.kept_by_shift(factor)
    for status in STATUSES:
        part = diff.part(status)
        rgb = plot.DIFF_RGB[status]
        if status == "kept":
            traces += _kept_lines(kept, factor)
        else:
            legend = f"{status} ({part.n_edges})"
            traces.append(plot.legend_entry(legend, status, plot.css_rgb(rgb)))
        attention, idx = _attention_edges(part)
        if status != "kept":
            for edges in (_residual_edges(part), _ffn_edges(part), attention):
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
                f"{_attention_text(f'<b>{status}</b> attention', layer, t, s, tokens)}<br>"
                f"weight {was:.3f} → {now:.3f}"
            )
        layers, positions = _columns(part.ffn)
        hx += layout.node_x("M", positions).tolist()
        hy += layout.node_y("M", layers).tolist()
        blocks = (r.ffn_weights[part.ffn].tolist() for r in (before, after))
        for layer, t, was, now in zip(layers.tolist(), positions.tolist(), *blocks, strict=True):
            htext.append(
                f"<b>{status}</b> {_node_text('M', layer, t, tokens)}<br>"
                f"weight {was:.3f} → {now:.3f}"
            )
    traces.append(plot.handles(hx, hy, [""] * len(hx), htext, "handles"))
    return plot.graph_figure(traces, tokens, graph.n_layers, position)
