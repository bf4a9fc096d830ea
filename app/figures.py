"""Plotly figures of the explorer: pure functions from llm-flow results to ``go.Figure``.

No Streamlit here, so every figure can be checked in a unit test without a browser.

The flow graph follows LLM-TT's picture (Tufanov et al. 2024, Fig. 1): x is the token position,
y the depth. Row ``0`` holds the embeddings ``X0_t``; layer ``l`` has the residual after
attention ``A{l}_t`` at ``y = 2l + 1`` and the residual after the layer ``I{l}_t`` at
``y = 2l + 2``; a row of output markers on top chooses the position whose route is drawn.
Each edge kind has its own colour and shape, so they stay apart where they share endpoints:
residual edges are vertical lines, the s = t attention edge bows to the left of them, and the
FFN path bends right through its block square ``M{l}_t``.

Plotly cannot click a line, so every edge carries an invisible marker that can be clicked; its
``customdata`` is the selection string of :mod:`app.selection`.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from app.selection import POSITION_PREFIX, Selection, attention_edge, effect_selection
from llm_flow.analyses.dataset import POSITION_CLASSES
from llm_flow.analyses.faithfulness import FaithfulnessReport
from llm_flow.analyses.interventions import Outcome
from llm_flow.analyses.lens import TokenScore
from llm_flow.analyses.route_diff import STATUSES, EdgeChange, RouteDiff
from llm_flow.engine.graph import FlowGraph, node_id, source_id
from llm_flow.engine.routes import Route
from llm_flow.io.export import Prediction

# Colours readable on Streamlit's light and dark themes alike.
ATTENTION_RGB = (66, 133, 244)
FFN_RGB = (245, 133, 24)
RESIDUAL_RGB = (128, 128, 128)
NODE_COLOUR = "rgb(110, 110, 110)"
HIGHLIGHT = "rgb(228, 26, 28)"
POSITIVE = "rgb(44, 160, 44)"
NEGATIVE = "rgb(214, 39, 40)"
DIFF_RGB = {"kept": (150, 150, 150), "lost": (214, 39, 40), "gained": (44, 160, 44)}

N_WEIGHT_BINS = 8  # edges are drawn in this many width/opacity steps (one trace each)
MAX_VISIBLE_TOKENS = 40  # longer prompts open zoomed on the output position; pan to see more
MAX_TICK_LABELS = 400  # beyond this, label every k-th token (plotly does not thin fixed ticks)
MAX_GRID_NODES = 20_000  # the faint off-route node grid is skipped on huge graphs
SELF_BOW = 0.3  # how far the s = t attention curve bows left of the residual line
FFN_OFFSET = 0.3  # how far the FFN square sits right of the residual line
HANDLE_AT = 0.65  # where along an attention edge its click marker sits (0 source, 1 target)


# -- coordinates and labels -------------------------------------------------------------------


def y_after_attention(layer: int) -> float:
    return 2 * layer + 1


def y_after_layer(layer: int) -> float:
    return 2 * layer + 2


def y_output(n_layers: int) -> float:
    return 2 * n_layers + 1


def display_token(token: str) -> str:
    """A token as a person can read it: whitespace made visible, never an empty label."""
    if token == "":
        return "∅"
    text = token.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return text if text.strip() else "␣" * len(text)


def plotly_text(token: str) -> str:
    """``display_token`` escaped for plotly, which reads ``<...>`` as markup (``<bos>`` would
    vanish)."""
    return html.escape(display_token(token), quote=False)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|$<>~])")


def markdown_text(text: str) -> str:
    """Text for ``st.markdown``/``st.error`` shown literally: a token like ``$`` or ``**`` (or
    a path with two ``_``) would otherwise turn into LaTeX or emphasis."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def figure_height(n_layers: int) -> int:
    """Tall enough for ~26 px per layer, so 30-layer models keep readable rows."""
    return int(min(1800, max(460, 160 + 26 * n_layers)))


# -- the flow graph ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edges:
    """Polylines of one edge kind: ``points`` [E, P, 2] and their ``weights`` [E]."""

    points: np.ndarray
    weights: np.ndarray


def _attention_edges(route: Route) -> tuple[_Edges, np.ndarray]:
    """Attention edges on the route as 3-point polylines, and their (layer, t, s) rows [E, 3]."""
    idx_t, weights_t = route.attention_edges()  # idx rows: (layer, target t, source s)
    idx, weights = idx_t.numpy(), weights_t.numpy()
    layer, t, s = (idx[:, i].astype(float) for i in range(3))
    y0, y1 = 2 * layer, 2 * layer + 1
    self_edge = t == s
    mid_x = np.where(self_edge, t - SELF_BOW, (s + t) / 2)
    points = np.stack(
        [np.stack([s, y0], -1), np.stack([mid_x, (y0 + y1) / 2], -1), np.stack([t, y1], -1)],
        axis=1,
    )  # [E, 3, 2]
    return _Edges(points, weights), idx


def _vertical_edges(mask: torch.Tensor, weights: torch.Tensor, y_from: float) -> _Edges:
    """Residual edges ``(t, 2l + y_from) → (t, 2l + y_from + 1)`` for the set cells of ``mask``."""
    idx = mask.nonzero().numpy()  # [E, 2] (layer, t)
    w = weights[mask].numpy()
    layer, t = idx[:, 0].astype(float), idx[:, 1].astype(float)
    y0 = 2 * layer + y_from
    points = np.stack([np.stack([t, y0], -1), np.stack([t, y0 + 1], -1)], axis=1)  # [E, 2, 2]
    return _Edges(points, w)


def _ffn_edges(route: Route) -> _Edges:
    """``A{l}_t → M{l}_t → I{l}_t`` as one bent polyline per FFN block on the route."""
    idx = route.ffn.nonzero().numpy()
    w = route.ffn_weights[route.ffn].numpy()
    layer, t = idx[:, 0].astype(float), idx[:, 1].astype(float)
    points = np.stack(
        [
            np.stack([t, 2 * layer + 1], -1),
            np.stack([t + FFN_OFFSET, 2 * layer + 1.5], -1),
            np.stack([t, 2 * layer + 2], -1),
        ],
        axis=1,
    )  # [E, 3, 2]
    return _Edges(points, w)


def weight_bin(weights: np.ndarray) -> np.ndarray:
    """Bin of each weight on a square-root scale, so the many small edges stay distinguishable."""
    level = np.sqrt(np.clip(weights, 0.0, 1.0))
    return np.minimum((level * N_WEIGHT_BINS).astype(int), N_WEIGHT_BINS - 1)


def _bin_style(rgb: tuple[int, int, int], b: int) -> tuple[float, str]:
    level = (b + 0.5) / N_WEIGHT_BINS
    width = 1.0 + 6.0 * level**2
    alpha = 0.45 + 0.55 * level
    return width, f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.2f})"


def _line_traces(edges: _Edges, rgb: tuple[int, int, int], group: str) -> list[go.Scatter]:
    """One line trace per weight bin: plotly styles a whole trace at once, so per-edge widths
    would otherwise need a trace per edge."""
    traces: list[go.Scatter] = []
    bins = weight_bin(edges.weights)
    for b in range(N_WEIGHT_BINS):
        chosen = edges.points[bins == b]  # [E_b, P, 2]
        if len(chosen) == 0:
            continue
        gap = np.full((len(chosen), 1, 2), np.nan)  # NaN breaks the line between edges
        xy = np.concatenate([chosen, gap], axis=1).reshape(-1, 2)
        width, colour = _bin_style(rgb, b)
        traces.append(
            go.Scatter(
                x=xy[:, 0],
                y=xy[:, 1],
                mode="lines",
                line={"width": width, "color": colour},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=group,
            )
        )
    return traces


def _legend_entry(name: str, group: str, colour: str, symbol: str | None = None) -> go.Scatter:
    """An empty trace that only shows ``name`` in the legend (and toggles its group)."""
    if symbol is None:
        return go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            line={"color": colour, "width": 3},
            name=name,
            legendgroup=group,
        )
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        marker={"color": colour, "symbol": symbol, "size": 9},
        name=name,
        legendgroup=group,
    )


def _handles(
    x: Sequence[float],
    y: Sequence[float],
    ids: Sequence[str],
    texts: Sequence[str],
    group: str,
    size: int = 11,
) -> go.Scatter:
    """Invisible, clickable markers; ``customdata`` says what a click selects."""
    return go.Scatter(
        x=list(x),
        y=list(y),
        mode="markers",
        marker={"size": size, "color": "rgba(0, 0, 0, 0)"},
        customdata=list(ids),
        hovertext=list(texts),
        hovertemplate="%{hovertext}<extra></extra>",
        showlegend=False,
        legendgroup=group,
        # Plotly dims unselected points after a click; the graph shows its own highlight.
        selected={"marker": {"opacity": 1}},
        unselected={"marker": {"opacity": 1}},
    )


def _node_trace(
    x: Sequence[float],
    y: Sequence[float],
    ids: Sequence[str],
    texts: Sequence[str],
    *,
    name: str,
    group: str,
    colour: str,
    symbol: str,
    size: float | list[int],
    opacity: float = 1.0,
    showlegend: bool = False,
) -> go.Scatter:
    return go.Scatter(
        x=list(x),
        y=list(y),
        mode="markers",
        marker={"size": size, "color": colour, "symbol": symbol, "opacity": opacity},
        customdata=list(ids),
        hovertext=list(texts),
        hovertemplate="%{hovertext}<extra></extra>",
        name=name,
        legendgroup=group,
        showlegend=showlegend,
        selected={"marker": {"opacity": opacity}},
        unselected={"marker": {"opacity": opacity}},
    )


_NODE_WORDS = {"X": "embedding", "A": "after attention", "I": "after layer", "M": "FFN block"}


def _node_text(kind: str, layer: int, t: int, tokens: Sequence[str]) -> str:
    where = "" if kind == "X" else f", layer {layer}"
    return (
        f"<b>{node_id(kind, layer, t)}</b> {_NODE_WORDS[kind]}{where}<br>"
        f"token {t}: {plotly_text(tokens[t])}"
    )


def _residual_nodes(
    route: Route, n_layers: int, tokens: Sequence[str], on_route: bool
) -> tuple[list[float], list[float], list[str], list[str]]:
    """Coordinates, ids and hover texts of the residual nodes on (or off) the route."""
    xs: list[float] = []
    ys: list[float] = []
    ids: list[str] = []
    texts: list[str] = []
    masks = [("X", route.embeddings[None, :], lambda _l: 0.0)]
    masks += [("A", route.after_attention, y_after_attention)]
    masks += [("I", route.after_layer, y_after_layer)]
    for kind, mask, y_of in masks:
        chosen = mask if on_route else ~mask
        for layer, t in chosen.nonzero().tolist():
            xs.append(t)
            ys.append(y_of(layer))
            ids.append(node_id(kind, layer, t))
            texts.append(_node_text(kind, layer, t, tokens))
    return xs, ys, ids, texts


def _route_nodes(
    route: Route, tokens: Sequence[str], *, name: str, sizes: tuple[int, int], legend: bool = False
) -> go.Scatter:
    """The residual nodes on ``route``; ``sizes`` = (after attention, other): after-attention
    nodes smaller, so a column reads as layers, not a bead chain."""
    xs, ys, ids, texts = _residual_nodes(route, route.graph.n_layers, tokens, on_route=True)
    return _node_trace(
        xs,
        ys,
        ids,
        texts,
        name=name,
        group="nodes",
        colour=NODE_COLOUR,
        symbol="circle",
        size=[sizes[0] if i.startswith("A") else sizes[1] for i in ids],
        showlegend=legend,
    )


def _x_ticks(tokens: Sequence[str]) -> tuple[list[int], list[str]]:
    step = max(1, math.ceil(len(tokens) / MAX_TICK_LABELS))
    ticks = list(range(0, len(tokens), step))
    return ticks, [plotly_text(tokens[t]) for t in ticks]


def _y_ticks(n_layers: int) -> tuple[list[float], list[str]]:
    step = 1 if n_layers <= 40 else math.ceil(n_layers / 40)
    vals = [0.0] + [2 * layer + 1.5 for layer in range(0, n_layers, step)] + [y_output(n_layers)]
    texts = ["emb"] + [str(layer) for layer in range(0, n_layers, step)] + ["out"]
    return vals, texts


def x_window(n_tokens: int, position: int) -> tuple[float, float]:
    """The x range a figure opens on: everything, or the last tokens up to ``position``."""
    if n_tokens <= MAX_VISIBLE_TOKENS:
        return -0.7, n_tokens - 0.4
    high = max(position, MAX_VISIBLE_TOKENS - 1)
    return high - MAX_VISIBLE_TOKENS + 0.6, high + 0.6


def flow_figure(
    graph: FlowGraph,
    route: Route,
    predictions: Sequence[Prediction],
    *,
    position: int,
    selection: Selection | None = None,
) -> go.Figure:
    """The layer × token route graph with clickable edges, blocks, nodes and output markers.

    ``predictions[t]`` is the model's next-token prediction after token t (shown on hover of
    the output markers). Edge widths and opacities grow with the route's (thresholded, maybe
    renormalized) weights.
    """
    n_layers, n_tokens, tokens = graph.n_layers, graph.n_tokens, graph.tokens
    traces: list[go.Scatter] = []

    # Off-route nodes: a faint grid, so the picture keeps its shape and any node can be read.
    if 2 * n_layers * n_tokens <= MAX_GRID_NODES:
        xs, ys, ids, texts = _residual_nodes(route, n_layers, tokens, on_route=False)
        traces.append(
            _node_trace(
                xs,
                ys,
                ids,
                texts,
                name="residual (off route)",
                group="nodes",
                colour=NODE_COLOUR,
                symbol="circle",
                size=4,
                opacity=0.3,
            )
        )

    attention, att_idx = _attention_edges(route)
    attn_res = _vertical_edges(route.attn_residual, route.attn_residual_weights, 0.0)
    ffn_res = _vertical_edges(route.ffn_residual, route.ffn_residual_weights, 1.0)
    ffn = _ffn_edges(route)
    residual = _Edges(
        np.concatenate([attn_res.points, ffn_res.points]),
        np.concatenate([attn_res.weights, ffn_res.weights]),
    )
    rgb = {"attention": ATTENTION_RGB, "ffn": FFN_RGB, "residual": RESIDUAL_RGB}
    traces.append(_legend_entry("residual", "residual", _rgb(RESIDUAL_RGB)))
    traces += _line_traces(residual, rgb["residual"], "residual")
    traces.append(_legend_entry("FFN", "ffn", _rgb(FFN_RGB)))
    traces += _line_traces(ffn, rgb["ffn"], "ffn")
    traces.append(_legend_entry("attention", "attention", _rgb(ATTENTION_RGB)))
    traces += _line_traces(attention, rgb["attention"], "attention")

    # Click handles of attention edges; residual edges select the node they lead to.
    hx, hy, hid, htext = [], [], [], []
    for (layer, t, s), weight in zip(att_idx.tolist(), attention.weights.tolist(), strict=True):
        x, y = _edge_handle(layer, t, s)
        hx.append(x)
        hy.append(y)
        edge = attention_edge(layer, t, s)
        hid.append(edge.id)
        htext.append(
            f"<b>attention</b> {source_id(layer, s)} → {node_id('A', layer, t)}<br>"
            f"{plotly_text(tokens[s])} → {plotly_text(tokens[t])}, weight {weight:.3f}"
        )
    traces.append(_handles(hx, hy, hid, htext, "attention"))
    rx, ry, rid, rtext = [], [], [], []
    for mask, weights, y_from, target in (
        (route.attn_residual, route.attn_residual_weights, 0.5, "A"),
        (route.ffn_residual, route.ffn_residual_weights, 1.5, "I"),
    ):
        values = weights[mask].tolist()
        for (layer, t), weight in zip(mask.nonzero().tolist(), values, strict=True):
            rx.append(t)
            ry.append(2 * layer + y_from)
            rid.append(node_id(target, layer, t))
            rtext.append(
                f"<b>residual</b> → {node_id(target, layer, t)}<br>"
                f"token {t}: {plotly_text(tokens[t])}, weight {weight:.3f}"
            )
    traces.append(_handles(rx, ry, rid, rtext, "residual", size=9))

    # FFN blocks on the route: small squares that select the neuron panel.
    fx, fy, fid, ftext = [], [], [], []
    ffn_weights = route.ffn_weights[route.ffn].tolist()
    for (layer, t), weight in zip(route.ffn.nonzero().tolist(), ffn_weights, strict=True):
        fx.append(t + FFN_OFFSET)
        fy.append(2 * layer + 1.5)
        fid.append(node_id("M", layer, t))
        ftext.append(f"{_node_text('M', layer, t, tokens)}<br>weight {weight:.3f}")
    traces.append(
        _node_trace(
            fx,
            fy,
            fid,
            ftext,
            name="FFN block",
            group="ffn",
            colour=_rgb(FFN_RGB),
            symbol="square",
            size=8,
        )
    )

    traces.append(_route_nodes(route, tokens, name="residual node", sizes=(5, 8), legend=True))

    traces.append(_output_row(n_layers, tokens, predictions, position))
    if selection is not None:
        traces += _highlight(selection, route, n_layers)

    return _graph_figure(traces, tokens, n_layers, position)


def _graph_figure(
    traces: list[go.Scatter], tokens: Sequence[str], n_layers: int, position: int
) -> go.Figure:
    """The layer × token axes, legend and height every graph picture shares."""
    # An empty trace on a second x axis: plotly draws an axis only when a trace uses it, and
    # the tall figure needs its token labels on top as well as at the bottom.
    traces.append(go.Scatter(x=[None], y=[None], xaxis="x2", showlegend=False, hoverinfo="skip"))
    fig = go.Figure(traces)
    n_tokens = len(tokens)
    tick_vals, tick_text = _x_ticks(tokens)
    y_vals, y_text = _y_ticks(n_layers)
    token_axis = {
        "tickvals": tick_vals,
        "ticktext": tick_text,
        "showgrid": False,
        "zeroline": False,
        "title": None,
    }
    fig.update_layout(
        height=figure_height(n_layers),
        margin={"l": 40, "r": 10, "t": 80, "b": 10},
        dragmode="pan",
        hovermode="closest",
        clickmode="event+select",
        legend={
            "orientation": "h",
            "yref": "container",
            "y": 1.0,
            "yanchor": "top",
            "xanchor": "left",
            "x": 0,
        },
        xaxis={**token_axis, "range": list(x_window(n_tokens, position))},
        xaxis2={**token_axis, "overlaying": "x", "side": "top", "matches": "x"},
        yaxis={
            "tickvals": y_vals,
            "ticktext": y_text,
            # Head room above the output row for the chosen position's predicted token.
            "range": [-0.8, y_output(n_layers) + 2.2],
            "fixedrange": True,
            "showgrid": False,
            "zeroline": False,
            "title": {"text": "layer", "standoff": 2},
        },
    )
    return fig


def _edge_handle(layer: int, t: int, s: int) -> tuple[float, float]:
    """Where the click/hover marker of attention edge s → t of ``layer`` sits."""
    if s == t:
        return t - SELF_BOW, 2 * layer + 0.5
    return s + HANDLE_AT * (t - s), 2 * layer + HANDLE_AT


def diff_figure(diff: RouteDiff, *, position: int) -> go.Figure:
    """The routes before and after an intervention in one picture: edges on both routes grey,
    edges only before red (lost), only after green (gained); widths follow the weight on the
    route each edge is on (kept edges: after). Hover an attention edge or an FFN block for its
    weights before → after."""
    before, after = diff.before, diff.after
    graph = before.graph
    n_layers, tokens = graph.n_layers, graph.tokens
    union = replace(
        after,
        embeddings=before.embeddings | after.embeddings,
        after_attention=before.after_attention | after.after_attention,
        after_layer=before.after_layer | after.after_layer,
    )
    traces: list[go.Scatter] = []
    traces.append(_route_nodes(union, tokens, name="node", sizes=(4, 6)))
    hx, hy, htext = [], [], []
    for status in STATUSES:
        part = diff.part(status)
        rgb = DIFF_RGB[status]
        traces.append(_legend_entry(f"{status} ({part.n_edges})", status, _rgb(rgb)))
        attention, idx = _attention_edges(part)
        for edges in (
            _vertical_edges(part.attn_residual, part.attn_residual_weights, 0.0),
            _vertical_edges(part.ffn_residual, part.ffn_residual_weights, 1.0),
            _ffn_edges(part),
            attention,
        ):
            traces += _line_traces(edges, rgb, status)
        for layer, t, s in idx.tolist():
            x, y = _edge_handle(layer, t, s)
            was, now = (_attention_weight(r, layer, t, s) for r in (before, after))
            hx.append(x)
            hy.append(y)
            htext.append(
                f"<b>{status}</b> attention {source_id(layer, s)} → {node_id('A', layer, t)}<br>"
                f"{plotly_text(tokens[s])} → {plotly_text(tokens[t])}<br>"
                f"weight {was:.3f} → {now:.3f}"
            )
        for layer, t in part.ffn.nonzero().tolist():
            was, now = (float(r.ffn_weights[layer, t]) for r in (before, after))
            hx.append(t + FFN_OFFSET)
            hy.append(2 * layer + 1.5)
            htext.append(
                f"<b>{status}</b> {_node_text('M', layer, t, tokens)}<br>"
                f"weight {was:.3f} → {now:.3f}"
            )
    traces.append(_handles(hx, hy, [""] * len(hx), htext, "handles"))
    return _graph_figure(traces, tokens, n_layers, position)


def _attention_weight(route: Route, layer: int, t: int, s: int) -> float:
    """The weight of attention edge s → t of ``layer`` on ``route`` (0 when it is not on it)."""
    if not bool(route.attention[layer, t, s]):
        return 0.0
    return float(route.graph.attention[layer, t, s] * route.attn_factor[layer, t])


def _rgb(rgb: tuple[int, int, int]) -> str:
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


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
        y=[y_output(n_layers)] * n,
        mode="markers+text",
        marker={
            "symbol": "triangle-down",
            "size": [15 if c else 10 for c in chosen],
            "color": [HIGHLIGHT if c else NODE_COLOUR for c in chosen],
        },
        text=[plotly_text(predictions[t].token) if chosen[t] else "" for t in range(n)],
        textposition="top center",
        textfont={"color": HIGHLIGHT},
        customdata=[f"{POSITION_PREFIX}{t}" for t in range(n)],
        hovertext=texts,
        hovertemplate="%{hovertext}<extra></extra>",
        name="output position",
        showlegend=False,
        selected={"marker": {"opacity": 1}},
        unselected={"marker": {"opacity": 1}},
        cliponaxis=False,
    )


def _highlight(selection: Selection, route: Route, n_layers: int) -> list[go.Scatter]:
    """A red ring (and, for an edge, a red line) on what is selected."""
    layer, t = selection.layer, selection.token
    traces: list[go.Scatter] = []
    if selection.kind == "attention" and selection.source is not None:
        s = selection.source
        mid_x = t - SELF_BOW if s == t else (s + t) / 2
        traces.append(
            go.Scatter(
                x=[s, mid_x, t],
                y=[2 * layer, 2 * layer + 0.5, 2 * layer + 1],
                mode="lines",
                line={"color": HIGHLIGHT, "width": 3, "dash": "dot"},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        x, y = _edge_handle(layer, t, s)
    elif selection.kind == "ffn":
        x, y = t + FFN_OFFSET, 2 * layer + 1.5
    elif selection.node == "X":
        x, y = t, 0.0
    elif selection.node == "A":
        x, y = t, y_after_attention(layer)
    else:
        x, y = t, y_after_layer(layer)
    traces.append(
        go.Scatter(
            x=[x],
            y=[y],
            mode="markers",
            marker={
                "symbol": "circle-open",
                "size": 18,
                "color": HIGHLIGHT,
                "line": {"width": 3, "color": HIGHLIGHT},
            },
            hoverinfo="skip",
            showlegend=False,
        )
    )
    return traces


# -- panels -----------------------------------------------------------------------------------


def heads_figure(contributions: Sequence[float], selected: int | None = None) -> go.Figure:
    """Each head's contribution to one attention edge, sorted, the selected head in red."""
    order = sorted(range(len(contributions)), key=lambda h: -contributions[h])
    colours = [HIGHLIGHT if h == selected else _rgb(ATTENTION_RGB) for h in order]
    fig = go.Figure(
        go.Bar(
            x=[f"head {h}" for h in order],
            y=[contributions[h] for h in order],
            marker_color=colours,
            customdata=order,
            hovertemplate="head %{customdata}: %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=260,
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        yaxis={"title": "contribution"},
        xaxis={"type": "category"},
    )
    return fig


HEATMAP_WINDOW = 48  # longer prompts open a heatmap zoomed on the edge's cell
HEATMAP_HOVER_TOKENS = 128  # above this, hover shows indices only (labels would be T² strings)


def heatmap_figure(
    matrix: torch.Tensor,
    tokens: Sequence[str],
    *,
    rgb: tuple[int, int, int],
    value_name: str,
    mark: tuple[int, int] | None = None,
) -> go.Figure:
    """A query × source heatmap (rows: query t, columns: source s) for attention or
    contribution maps; the causal upper triangle is blank, ``mark`` (t, s) is outlined.

    Low values are transparent rather than white, so the map suits light and dark themes.
    """
    n = len(tokens)
    values = matrix.detach().float().cpu().numpy().copy()  # [T, S]
    values[np.triu(np.ones((n, n), dtype=bool), k=1)] = np.nan
    colour = f"{rgb[0]}, {rgb[1]}, {rgb[2]}"
    heatmap = go.Heatmap(
        z=values,
        x=list(range(n)),
        y=list(range(n)),
        colorscale=[[0.0, f"rgba({colour}, 0)"], [1.0, f"rgba({colour}, 1)"]],
        zmin=0.0,
        hoverongaps=False,
        colorbar={"thickness": 10},
    )
    if n <= HEATMAP_HOVER_TOKENS:
        labels = [f"{i}: {plotly_text(tok)}" for i, tok in enumerate(tokens)]
        heatmap.customdata = np.array(
            [[(labels[i], labels[j]) for j in range(n)] for i in range(n)]
        )
        heatmap.hovertemplate = (
            "query %{customdata[0]}<br>source %{customdata[1]}<br>"
            f"{value_name} %{{z:.4f}}<extra></extra>"
        )
    else:
        heatmap.hovertemplate = (
            f"query %{{y}}<br>source %{{x}}<br>{value_name} %{{z:.4f}}<extra></extra>"
        )
    fig = go.Figure(heatmap)
    ticks, tick_text = _x_ticks(tokens)
    x_axis: dict[str, object] = {"tickvals": ticks, "ticktext": tick_text, "title": "source"}
    y_axis: dict[str, object] = {"tickvals": ticks, "ticktext": tick_text, "title": "query"}
    visible = min(n, HEATMAP_WINDOW)
    if n > HEATMAP_WINDOW:
        t, s = mark if mark is not None else (n - 1, n - 1)
        x_axis["range"] = list(_window(s, n))
        y_axis["range"] = list(reversed(_window(t, n)))
    else:
        y_axis["autorange"] = "reversed"
    fig.update_layout(
        height=int(min(640, max(340, 140 + 12 * visible))),
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        xaxis=x_axis,
        yaxis=y_axis,
        plot_bgcolor="rgba(0, 0, 0, 0)",
    )
    if mark is not None:
        t, s = mark
        fig.add_shape(
            type="rect",
            x0=s - 0.5,
            x1=s + 0.5,
            y0=t - 0.5,
            y1=t + 0.5,
            line={"color": HIGHLIGHT, "width": 2},
        )
    return fig


def _window(center: int, n: int) -> tuple[float, float]:
    """A ``HEATMAP_WINDOW``-wide axis range around ``center``, kept inside ``[0, n)``."""
    low = min(max(center - HEATMAP_WINDOW // 2, 0), n - HEATMAP_WINDOW)
    return low - 0.5, low + HEATMAP_WINDOW - 0.5


def neurons_figure(
    neurons: Sequence[int],
    contributions: Sequence[float],
    activations: Sequence[float],
    selected: int | None = None,
) -> go.Figure:
    """Top neurons by contribution; bar colour = the sign of the neuron's activation."""
    colours = [POSITIVE if a >= 0 else NEGATIVE for a in activations]
    outline = [3 if n == selected else 0 for n in neurons]
    fig = go.Figure(
        go.Bar(
            x=[f"n{n}" for n in neurons],
            y=list(contributions),
            marker={"color": colours, "line": {"width": outline, "color": HIGHLIGHT}},
            customdata=np.array([[n, a] for n, a in zip(neurons, activations, strict=True)]),
            hovertemplate=(
                "neuron %{customdata[0]:.0f}<br>contribution %{y:.4f}<br>"
                "activation %{customdata[1]:+.3f}<extra></extra>"
            ),
            showlegend=False,
        )
    )
    for name, colour in (("activation > 0", POSITIVE), ("activation < 0", NEGATIVE)):
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color=colour, name=name, showlegend=True))
    fig.update_layout(
        height=280,
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        yaxis={"title": "contribution"},
        xaxis={"type": "category"},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
        bargap=0.25,
    )
    return fig


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


# -- beyond the graph: contrast, ablation, faithfulness ---------------------------------------


def effect_table(frame: pd.DataFrame, tokens: Sequence[str]) -> pd.DataFrame:
    """The contrast effect table as shown (``analyse_contrast(...).frame()`` plus a ``tokens``
    column): strongest first by ``max(|direct_effect|, |attribution|)``."""
    strength = np.maximum(frame["direct_effect"].abs(), frame["attribution"].abs())
    table = frame.loc[strength.sort_values(ascending=False, kind="stable").index]
    table = table.reset_index(drop=True)
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
    """Each row's head (head rows) or neuron (neuron rows); ``None`` for FFN blocks."""
    return tuple(
        int(h) if k == "head" else int(n) if k == "neuron" else None
        for k, h, n in zip(table["kind"], table["head"], table["neuron"], strict=True)
    )


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


def route_diff_table(edges: Sequence[EdgeChange], tokens: Sequence[str]) -> pd.DataFrame:
    """The edges of a route diff (largest |change| first, as :meth:`RouteDiff.edges` gives
    them) with the tokens they connect."""

    def token_of(node: str) -> str:
        return table_token(tokens[int(node.rsplit("_", 1)[1])])

    rows = [
        (
            e.status,
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
    columns = ["status", "kind", "edge", "tokens", "before", "after", "change"]
    return pd.DataFrame(rows, columns=columns)


# -- dataset mode -----------------------------------------------------------------------------

_CLASS_TITLES = {"last": "last token", "other": "other tokens"}


def frequency_matrix(
    frame: pd.DataFrame, position_class: str, value: str = "frequency"
) -> tuple[np.ndarray, list[str]]:
    """``value`` per layer (rows) × head (columns) of a dataset table, the FFN block as the last
    column → (matrix [L, H + 1], column labels)."""
    rows = frame[frame["position_class"] == position_class]
    heads = rows[rows["kind"] == "head"]
    ffn = rows[rows["kind"] == "ffn"]
    n_layers = int(frame["layer"].max()) + 1
    n_heads = int(heads["head"].max()) + 1 if len(heads) else 0
    matrix = np.full((n_layers, n_heads + 1), np.nan)
    matrix[heads["layer"].to_numpy(int), heads["head"].to_numpy(int)] = heads[value].to_numpy(float)
    matrix[ffn["layer"].to_numpy(int), n_heads] = ffn[value].to_numpy(float)
    return matrix, [str(h) for h in range(n_heads)] + ["FFN"]


def frequency_figure(frame: pd.DataFrame, *, value: str = "frequency") -> go.Figure:
    """How often each head (and FFN block) is on the routes: layer × head heatmaps, the last
    token beside the other tokens. ``value="frequency_diff"`` (a comparison's ``diff``) is drawn
    on a diverging scale around 0."""
    diverging = value.endswith("_diff")
    fig = make_subplots(
        rows=1,
        cols=len(POSITION_CLASSES),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=[_CLASS_TITLES[c] for c in POSITION_CLASSES],
    )
    for i, position_class in enumerate(POSITION_CLASSES):
        matrix, labels = frequency_matrix(frame, position_class, value)
        fig.add_trace(
            go.Heatmap(
                z=matrix,
                x=labels,
                y=list(range(matrix.shape[0])),
                coloraxis="coloraxis",
                hovertemplate=(
                    f"{_CLASS_TITLES[position_class]}<br>layer %{{y}}, head %{{x}}<br>"
                    f"{value.replace('_', ' ')} %{{z:.2f}}<extra></extra>"
                ),
                xgap=1,
                ygap=1,
            ),
            row=1,
            col=i + 1,
        )
    n_layers = int(frame["layer"].max()) + 1
    colour = f"{ATTENTION_RGB[0]}, {ATTENTION_RGB[1]}, {ATTENTION_RGB[2]}"
    scale = (
        [[0.0, NEGATIVE], [0.5, "rgba(128, 128, 128, 0.08)"], [1.0, POSITIVE]]
        if diverging
        else [[0.0, f"rgba({colour}, 0.04)"], [1.0, f"rgba({colour}, 1)"]]
    )
    fig.update_layout(
        height=int(min(900, max(300, 120 + 16 * n_layers))),
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        coloraxis={
            "colorscale": scale,
            "cmin": -1.0 if diverging else 0.0,
            "cmax": 1.0,
            "colorbar": {"thickness": 10, "title": {"text": "b − a" if diverging else "share"}},
        },
        plot_bgcolor="rgba(0, 0, 0, 0)",
    )
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="head", type="category")
    return fig
