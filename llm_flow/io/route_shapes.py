"""A route's elements as plot shapes, shared by the route picture and the route-diff picture
(:mod:`llm_flow.io.figure`): edge polylines with their weights, residual-node markers, and
hover texts. Where each element sits is :mod:`llm_flow.io.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from llm_flow.engine.nodes import NODE_WORDS, NodeKind, node_id, source_id
from llm_flow.engine.routes import Route
from llm_flow.io import layout, plot
from llm_flow.io.text import plotly_text

# -- edges ------------------------------------------------------------------------------------


def mask_columns(mask: torch.Tensor) -> list[np.ndarray]:
    """The index columns of a mask's set cells, e.g. (layer [E], token [E])."""
    idx = mask.nonzero().numpy()
    return [idx[:, i] for i in range(idx.shape[1])]


def attention_edges(route: Route, cols: layout.Columns) -> tuple[plot.Edges, np.ndarray]:
    """Attention edges on the route as polylines, and their (layer, t, s) rows [E, 3]."""
    idx_t, weights = route.attention_edges()  # idx rows: (layer, target t, source s)
    idx = idx_t.numpy()
    points = layout.attention_points(idx[:, 0], cols.of(idx[:, 1]), cols.of(idx[:, 2]))
    return plot.Edges(points, weights.numpy()), idx


def residual_parts(
    route: Route,
) -> tuple[tuple[layout.ResidualTarget, torch.Tensor, torch.Tensor], ...]:
    """(the node kind they lead to, mask [L, T], weights [L, T]) of both kinds of residual edge:
    into ``A{l}_t`` and into ``I{l}_t``."""
    return (
        ("A", route.attn_residual, route.attn_residual_weights),
        ("I", route.ffn_residual, route.ffn_residual_weights),
    )


def residual_edges(route: Route, cols: layout.Columns) -> plot.Edges:
    """Both kinds of residual edge on the route as vertical lines."""
    parts = residual_parts(route)
    points = []
    for into, mask, _ in parts:
        layers, tokens = mask_columns(mask)
        points.append(layout.residual_points(into, layers, cols.of(tokens)))
    weights = [w[mask].numpy() for _, mask, w in parts]
    return plot.Edges(np.concatenate(points), np.concatenate(weights))


def ffn_edges(route: Route, cols: layout.Columns) -> plot.Edges:
    """``A{l}_t → M{l}_t → I{l}_t``, one bent polyline per FFN block on the route."""
    layers, tokens = mask_columns(route.ffn)
    points = layout.ffn_points(layers, cols.of(tokens))
    return plot.Edges(points, route.ffn_weights[route.ffn].numpy())


# -- markers ----------------------------------------------------------------------------------


def node_text(kind: NodeKind, layer: int, t: int, tokens: Sequence[str]) -> str:
    where = "" if kind == "X" else f"layer {layer} · "
    return (
        f"<b>{node_id(kind, layer, t)}</b> {where}{NODE_WORDS[kind]}<br>"
        f"token {t}: {plotly_text(tokens[t])}"
    )


def residual_nodes(
    route: Route, tokens: Sequence[str], on_route: bool, cols: layout.Columns
) -> tuple[list[float], list[float], list[str], list[str]]:
    """Coordinates, ids and hover texts of the residual nodes on (or off) the route, in the
    shown columns. A node on the route names the weight of the residual edge into it, which
    has no click handle of its own (one marker per residual edge made each redraw ~40 % slower
    in the browser)."""
    xs: list[float] = []
    ys: list[float] = []
    ids: list[str] = []
    texts: list[str] = []
    masks: tuple[tuple[NodeKind, torch.Tensor], ...] = (
        ("X", route.embeddings[None, :]),
        ("A", route.after_attention),
        ("I", route.after_layer),
    )
    residual = {into: (mask, weights) for into, mask, weights in residual_parts(route)}
    for kind, mask in masks:
        layers, positions = mask_columns(mask if on_route else ~mask)
        shown = ~np.isnan(cols.of(positions))
        layers, positions = layers[shown], positions[shown]
        xs += layout.node_x(kind, cols.of(positions)).tolist()
        ys += layout.node_y(kind, layers).tolist()
        for layer, t in zip(layers.tolist(), positions.tolist(), strict=True):
            ids.append(node_id(kind, layer, t))
            text = node_text(kind, layer, t, tokens)
            if on_route and kind in residual and residual[kind][0][layer, t]:
                text += f"<br>residual in: weight {float(residual[kind][1][layer, t]):.3f}"
            texts.append(text)
    return xs, ys, ids, texts


def route_nodes(
    route: Route,
    tokens: Sequence[str],
    cols: layout.Columns,
    *,
    name: str,
    sizes: tuple[int, int],
    legend: bool = False,
) -> list[go.Scatter]:
    """The residual nodes on ``route`` as two traces: after attention (``{name} after
    attention``, size ``sizes[0]``: smaller, so a column reads as layers, not a bead chain), then
    the embeddings and after-layer nodes (``name``, ``sizes[1]``). One size per trace: plotly.js
    styles such a trace once rather than point by point (a redraw ~15 % faster, measured)."""
    xs, ys, ids, texts = residual_nodes(route, tokens, on_route=True, cols=cols)
    traces = []
    for after_attention, size, label, shown in (
        (True, sizes[0], f"{name} after attention", False),
        (False, sizes[1], name, legend),
    ):
        keep = [i.startswith("A") == after_attention for i in ids]
        marker: dict[str, object] = {"size": size, "color": plot.NODE_COLOUR, "symbol": "circle"}
        traces.append(
            plot.markers(
                [x for x, k in zip(xs, keep, strict=True) if k],
                [y for y, k in zip(ys, keep, strict=True) if k],
                [i for i, k in zip(ids, keep, strict=True) if k],
                [t for t, k in zip(texts, keep, strict=True) if k],
                group="nodes",
                marker=marker,
                name=label,
                showlegend=shown,
            )
        )
    return traces


def attention_text(title: str, layer: int, t: int, s: int, tokens: Sequence[str]) -> str:
    """Hover text of attention edge s → t of ``layer``, after ``title`` (markup allowed)."""
    return (
        f"{title} {source_id(layer, s)} → {node_id('A', layer, t)}<br>"
        f"{plotly_text(tokens[s])} → {plotly_text(tokens[t])}"
    )
