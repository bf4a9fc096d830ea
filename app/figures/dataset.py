"""Dataset mode's figures: how often each head, FFN block and expert is on the routes of a prompt
file, as layer × head heatmaps (the last token beside the other tokens)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from llm_flow.analyses.dataset import POSITION_CLASSES
from llm_flow.io.plot import ATTENTION_RGB, NEGATIVE, POSITIVE

_CLASS_TITLES = {"last": "last token", "other": "other tokens"}


def frequency_matrix(
    frame: pd.DataFrame, position_class: str, value: str = "frequency"
) -> tuple[np.ndarray, list[str]]:
    """``value`` per layer (rows) × head (columns) of a dataset table, then the FFN block and,
    for a mixture of experts, each routed expert and the shared expert → (matrix [L, columns],
    column labels: heads ``0 …``, ``FFN``, experts ``e0 …``, ``shared``)."""
    rows = frame[frame["position_class"] == position_class]
    heads = rows[rows["kind"] == "head"]
    ffn = rows[rows["kind"] == "ffn"]
    experts = rows[rows["kind"] == "expert"]
    shared = rows[rows["kind"] == "shared_expert"]
    n_layers = int(frame["layer"].max()) + 1
    n_heads = int(heads["head"].max()) + 1 if len(heads) else 0
    n_experts = int(experts["expert"].max()) + 1 if len(experts) else 0
    labels = [str(h) for h in range(n_heads)] + ["FFN"] + [f"e{e}" for e in range(n_experts)]
    labels += ["shared"] if len(shared) else []
    matrix = np.full((n_layers, len(labels)), np.nan)
    matrix[heads["layer"].to_numpy(int), heads["head"].to_numpy(int)] = heads[value].to_numpy(float)
    matrix[ffn["layer"].to_numpy(int), n_heads] = ffn[value].to_numpy(float)
    if len(experts):
        columns = n_heads + 1 + experts["expert"].to_numpy(int)
        matrix[experts["layer"].to_numpy(int), columns] = experts[value].to_numpy(float)
    if len(shared):
        matrix[shared["layer"].to_numpy(int), len(labels) - 1] = shared[value].to_numpy(float)
    return matrix, labels


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
                    f"{_CLASS_TITLES[position_class]}<br>layer %{{y}}, %{{x}}<br>"
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
