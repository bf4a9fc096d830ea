"""Plotly building blocks of the route pictures (:mod:`llm_flow.io.figure`): colours, edges
drawn in weight bins, clickable markers and the layer × token axes every graph picture shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from llm_flow.io import layout
from llm_flow.io.text import plotly_text

# Colours readable on Streamlit's light and dark themes alike.
ATTENTION_RGB = (66, 133, 244)
FFN_RGB = (245, 133, 24)
RESIDUAL_RGB = (128, 128, 128)
NODE_COLOUR = "rgb(110, 110, 110)"
HIGHLIGHT = "rgb(228, 26, 28)"
POSITIVE = "rgb(44, 160, 44)"
NEGATIVE = "rgb(214, 39, 40)"
DIFF_RGB = {"kept": (150, 150, 150), "lost": (214, 39, 40), "gained": (44, 160, 44)}
# Kept edges on a diverging scale (ColorBrewer PuOr ends, grey middle): weaker ← → stronger.
SHIFT_RGB = {"weakened": (230, 97, 1), "similar": (150, 150, 150), "strengthened": (94, 60, 153)}

N_WEIGHT_BINS = 8  # edges are drawn in this many width/opacity steps (one trace each)


def css_rgb(rgb: tuple[int, int, int]) -> str:
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


def token_labels(tokens: Sequence[str]) -> tuple[list[int], list[str]]:
    """(positions, escaped labels) of a token axis (:func:`llm_flow.io.layout.token_ticks`)."""
    ticks = layout.token_ticks(tokens)
    return ticks, [plotly_text(tokens[t]) for t in ticks]


@dataclass(frozen=True)
class Edges:
    """Polylines of one edge kind: ``points`` [E, P, 2] and their ``weights`` [E]."""

    points: np.ndarray
    weights: np.ndarray


def weight_bin(weights: np.ndarray) -> np.ndarray:
    """Bin of each weight on a square-root scale, so the many small edges stay distinguishable."""
    level = np.sqrt(np.clip(weights, 0.0, 1.0))
    return np.minimum((level * N_WEIGHT_BINS).astype(int), N_WEIGHT_BINS - 1)


def bin_style(rgb: tuple[int, int, int], b: int) -> tuple[float, str]:
    """(line width, colour) of weight bin ``b``: wider and more opaque for larger weights."""
    level = (b + 0.5) / N_WEIGHT_BINS
    width = 1.0 + 6.0 * level**2
    alpha = 0.45 + 0.55 * level
    return width, f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.2f})"


def line_traces(edges: Edges, rgb: tuple[int, int, int], group: str) -> list[go.Scatter]:
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
        width, colour = bin_style(rgb, b)
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


def legend_entry(name: str, group: str, colour: str) -> go.Scatter:
    """An empty line trace that only shows ``name`` in the legend (and toggles its group)."""
    return go.Scatter(
        x=[None],
        y=[None],
        mode="lines",
        line={"color": colour, "width": 3},
        name=name,
        legendgroup=group,
    )


def markers(
    x: Sequence[float],
    y: Sequence[float],
    ids: Sequence[str],
    texts: Sequence[str],
    *,
    group: str,
    marker: dict[str, object],
    name: str | None = None,
    showlegend: bool = False,
) -> go.Scatter:
    """Markers whose ``customdata`` says what a click selects, with hover texts."""
    opacity = marker.get("opacity", 1)
    return go.Scatter(
        x=list(x),
        y=list(y),
        mode="markers",
        marker=marker,
        customdata=list(ids),
        hovertext=list(texts),
        hovertemplate="%{hovertext}<extra></extra>",
        name=name,
        legendgroup=group,
        showlegend=showlegend,
        # Plotly dims unselected points after a click; the graph shows its own highlight.
        selected={"marker": {"opacity": opacity}},
        unselected={"marker": {"opacity": opacity}},
    )


def handles(
    x: Sequence[float],
    y: Sequence[float],
    ids: Sequence[str],
    texts: Sequence[str],
    group: str,
    size: int = 11,
) -> go.Scatter:
    """Invisible, clickable markers over edges."""
    return markers(
        x, y, ids, texts, group=group, marker={"size": size, "color": "rgba(0, 0, 0, 0)"}
    )


def graph_figure(
    traces: list[go.Scatter], tokens: Sequence[str], n_layers: int, position: int
) -> go.Figure:
    """The layer × token axes, legend and height every graph picture shares."""
    # An empty trace on a second x axis: plotly draws an axis only when a trace uses it, and
    # the tall figure needs its token labels on top as well as at the bottom.
    traces.append(go.Scatter(x=[None], y=[None], xaxis="x2", showlegend=False, hoverinfo="skip"))
    fig = go.Figure(traces)
    tick_vals, tick_text = token_labels(tokens)
    y_vals, y_text = layout.layer_ticks(n_layers)
    token_axis = {
        "tickvals": tick_vals,
        "ticktext": tick_text,
        "showgrid": False,
        "zeroline": False,
        "title": None,
    }
    fig.update_layout(
        height=layout.figure_height(n_layers),
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
        xaxis={**token_axis, "range": list(layout.x_window(len(tokens), position))},
        xaxis2={**token_axis, "overlaying": "x", "side": "top", "matches": "x"},
        yaxis={
            "tickvals": y_vals,
            "ticktext": y_text,
            # Head room above the output row for the chosen position's predicted token.
            "range": [-0.8, layout.output_y(n_layers) + 2.2],
            "fixedrange": True,
            "showgrid": False,
            "zeroline": False,
            "title": {"text": "layer", "standoff": 2},
        },
    )
    return fig
