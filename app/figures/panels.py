"""Charts of the panel beside the graph: each head's share of an attention edge, query × source
heatmaps (attention and contribution maps) and an FFN block's top neurons."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from llm_flow.io.plot import ATTENTION_RGB, HIGHLIGHT, NEGATIVE, POSITIVE, css_rgb, token_labels
from llm_flow.io.text import plotly_text

HEATMAP_WINDOW = 48  # longer prompts open a heatmap zoomed on the edge's cell
HEATMAP_HOVER_TOKENS = 128  # above this, hover shows indices only (labels would be T² strings)
_MARGIN = {"l": 10, "r": 10, "t": 10, "b": 10}
# The plotly toolbar of the panel charts (no selection tools: clicks select in the graph).
PLOTLY_CONFIG = {
    "displaylogo": False,
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"],
}


def heads_figure(contributions: Sequence[float], selected: int | None = None) -> go.Figure:
    """Each head's contribution to one attention edge, sorted, the selected head in red."""
    order = sorted(range(len(contributions)), key=lambda h: -contributions[h])
    colours = [HIGHLIGHT if h == selected else css_rgb(ATTENTION_RGB) for h in order]
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
        height=260, margin=_MARGIN, yaxis={"title": "contribution"}, xaxis={"type": "category"}
    )
    return fig


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
    ticks, tick_text = token_labels(tokens)
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
        margin=_MARGIN,
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
        margin=_MARGIN,
        yaxis={"title": "contribution"},
        xaxis={"type": "category"},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
        bargap=0.25,
    )
    return fig


def experts_figure(
    labels: Sequence[str],
    contributions: Sequence[float],
    router_weights: Sequence[float],
    selected: str | None = None,
) -> go.Figure:
    """The experts of an MoE block at one token by contribution; hover: the router weight."""
    outline = [3 if label == selected else 0 for label in labels]
    fig = go.Figure(
        go.Bar(
            x=list(labels),
            y=list(contributions),
            marker={"color": POSITIVE, "line": {"width": outline, "color": HIGHLIGHT}},
            customdata=np.array(list(router_weights))[:, None],
            hovertemplate=(
                "%{x}<br>contribution %{y:.4f}<br>router weight %{customdata[0]:.3f}<extra></extra>"
            ),
            showlegend=False,
        )
    )
    fig.update_layout(
        height=260,
        margin=_MARGIN,
        yaxis={"title": "contribution"},
        xaxis={"type": "category"},
        bargap=0.25,
    )
    return fig


def score_terms_figure(
    names: Sequence[str], values: Sequence[float], targets: Sequence[str]
) -> go.Figure:
    """Horizontal bars of a score's largest terms (largest on top), positive and negative in
    their colours; ``targets`` are what a click on each bar selects ("" for none)."""
    fig = go.Figure(
        go.Bar(
            x=list(values)[::-1],
            y=[plotly_text(n) for n in names][::-1],
            orientation="h",
            marker_color=[POSITIVE if v >= 0 else NEGATIVE for v in values][::-1],
            customdata=list(targets)[::-1],
            hovertemplate="%{y}: %{x:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=max(160, 24 * len(names) + 40),
        margin=_MARGIN,
        xaxis={"title": "share of the score", "zeroline": True},
        yaxis={"type": "category"},
        clickmode="event+select",
    )
    return fig


def histogram_figure(edges: Sequence[float], counts: Sequence[int], measure: str) -> go.Figure:
    """A unit's histogram over a corpus, one bar per bin: ``counts[i]`` counts ``edges[i-1] ≤
    x < edges[i]`` (the first and last: below / at or above the ends), empty bins left out and
    the count axis logarithmic (a few large values next to many small ones)."""
    labels = [f"< {edges[0]:.3g}"]
    labels += [f"{lo:.3g} to {hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    labels.append(f"≥ {edges[-1]:.3g}")
    shown = [(label, c) for label, c in zip(labels, counts, strict=True) if c]
    fig = go.Figure(
        go.Bar(
            x=[label for label, _ in shown],
            y=[c for _, c in shown],
            marker_color=css_rgb(ATTENTION_RGB),
            hovertemplate="%{x}: %{y} tokens<extra></extra>",
        )
    )
    fig.update_layout(
        height=220,
        margin=_MARGIN,
        xaxis={"type": "category", "title": measure},
        yaxis={"type": "log", "title": "tokens"},
    )
    return fig
