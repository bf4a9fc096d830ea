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

# Colours readable on Streamlit's light and dark themes alike. Marker colours are hex: plotly.js
# parses a marker's colour for every point it draws, and "#6e6e6e" parses several times faster
# than "rgb(110, 110, 110)" (a τ step of a 400-token route styles ~2,500 points twice; issue 12).
ATTENTION_RGB = (66, 133, 244)
FFN_RGB = (245, 133, 24)
RESIDUAL_RGB = (128, 128, 128)
NODE_COLOUR = "#6e6e6e"  # rgb(110, 110, 110)
HIGHLIGHT = "#e41a1c"  # rgb(228, 26, 28)
INVISIBLE = "#00000000"  # transparent black: click handles
POSITIVE = "rgb(44, 160, 44)"
NEGATIVE = "rgb(214, 39, 40)"
DIFF_RGB = {"kept": (150, 150, 150), "lost": (214, 39, 40), "gained": (44, 160, 44)}
# Kept edges on a diverging scale (ColorBrewer PuOr ends, grey middle): weaker ← → stronger.
SHIFT_RGB = {"weakened": (230, 97, 1), "similar": (150, 150, 150), "strengthened": (94, 60, 153)}

N_WEIGHT_BINS = 8  # edges are drawn in this many width/opacity steps (one trace each)


def css_rgb(rgb: tuple[int, int, int]) -> str:
    """``rgb`` as a CSS hex colour (fast for plotly.js to parse, see ``NODE_COLOUR``)."""
    return f"#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}"


def token_labels(tokens: Sequence[str]) -> tuple[list[int], list[str]]:
    """(positions, escaped labels) of a plain token axis, e.g. a panel's heatmap
    (:func:`llm_flow.io.layout.thinned_ticks`)."""
    ticks = layout.thinned_ticks(len(tokens))
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
) -> go.Scatter:
    """Invisible, clickable markers over edges."""
    return markers(x, y, ids, texts, group=group, marker={"size": 11, "color": INVISIBLE})


def gap_marks(columns: layout.Columns, n_layers: int) -> list[go.Scatter]:
    """Where the compact view hides tokens: a dotted line between the columns either side and a
    "⋯" under the token axis saying which tokens are hidden (on hover)."""
    if not columns.gaps:
        return []
    top = layout.output_y(n_layers) + 0.5
    line_x: list[float | None] = []
    line_y: list[float | None] = []
    for gap in columns.gaps:
        line_x += [gap.x, gap.x, None]
        line_y += [-0.6, top, None]
    texts = [
        f"{gap.size} token{'s' if gap.size > 1 else ''} not on the route: "
        + (f"{gap.first}–{gap.last}" if gap.size > 1 else f"{gap.first}")
        for gap in columns.gaps
    ]
    return [
        go.Scatter(
            x=line_x,
            y=line_y,
            mode="lines",
            line={"color": "rgba(128, 128, 128, 0.45)", "width": 1, "dash": "dot"},
            hoverinfo="skip",
            showlegend=False,
            name="hidden tokens",
        ),
        go.Scatter(
            x=[gap.x for gap in columns.gaps],
            y=[-0.55] * len(columns.gaps),
            mode="text",
            text=["⋯"] * len(columns.gaps),
            textfont={"color": "rgb(128, 128, 128)", "size": 14},
            hovertext=texts,
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
            name="hidden tokens",
        ),
    ]


def graph_figure(
    traces: list[go.Scatter],
    tokens: Sequence[str],
    n_layers: int,
    position: int,
    columns: layout.Columns | None = None,
) -> go.Figure:
    """The layer × token axes, legend and height every graph picture shares; ``columns`` (the
    full view when ``None``) says where each token's column is."""
    columns = columns or layout.all_columns(len(tokens))
    traces += gap_marks(columns, n_layers)
    # Token labels at the bottom only: the figure fits a window now, and a second, matching x
    # axis for labels on top cost a third of the browser's drawing time (~0.12 s per step).
    fig = go.Figure(traces)
    ticks = layout.token_ticks(columns, position)
    tick_vals, tick_text = columns.of(ticks).tolist(), [plotly_text(tokens[t]) for t in ticks]
    y_vals, y_text = layout.layer_ticks(n_layers)
    # Labels never hidden for reaching past the figure: plotly.js's default check measures
    # every label after every redraw (~25 ms of a 400-token τ step in the browser), and the
    # margins already grow to fit them (Streamlit's automargin).
    overflow = "allow"
    token_axis = {
        "tickvals": tick_vals,
        "ticktext": tick_text,
        "ticklabeloverflow": overflow,
        "showgrid": False,
        "zeroline": False,
        "title": None,
    }
    fig.update_layout(
        height=layout.figure_height(n_layers),
        margin={"l": 40, "r": 10, "t": 45, "b": 10},  # the legend; token labels are below
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
        xaxis={**token_axis, "range": list(layout.x_window(columns, position))},
        yaxis={
            "tickvals": y_vals,
            "ticktext": y_text,
            # Head room above the output row for the chosen position's predicted token.
            "range": [-0.8, layout.output_y(n_layers) + 2.2],
            "fixedrange": True,
            "ticklabeloverflow": overflow,
            "showgrid": False,
            "zeroline": False,
            "title": {"text": "layer", "standoff": 2},
        },
    )
    return fig
