"""Tests for app/figures/panels.py: the panel's charts, checked without a browser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.figures.panels import HEATMAP_WINDOW, heads_figure, heatmap_figure, neurons_figure
from llm_flow.io.plot import ATTENTION_RGB, FFN_RGB, HIGHLIGHT, NEGATIVE, POSITIVE


def test_heads_figure_sorts_and_marks_the_selected_head() -> None:
    fig = heads_figure([0.1, 0.5, 0.2], selected=2)
    bar = fig.data[0]
    assert list(bar.x) == ["head 1", "head 2", "head 0"]
    assert list(bar.y) == [0.5, 0.2, 0.1]
    assert bar.marker.color[1] == HIGHLIGHT
    assert bar.marker.color[0] != HIGHLIGHT


def test_heatmap_blanks_the_future_and_outlines_the_edge() -> None:
    matrix = torch.rand(4, 4)
    fig = heatmap_figure(
        matrix, ["a", "b", "<c>", "d"], rgb=ATTENTION_RGB, value_name="x", mark=(3, 1)
    )
    z = np.array(fig.data[0].z, dtype=float)
    assert np.isnan(z[0, 1]) and np.isnan(z[2, 3])
    assert z[3, 1] == pytest.approx(float(matrix[3, 1]))
    shape = fig.layout.shapes[0]
    assert (shape.x0, shape.y0) == (0.5, 2.5)
    assert "&lt;c&gt;" in fig.layout.xaxis.ticktext
    assert fig.data[0].colorscale[0][1].endswith(", 0)")  # low values see-through (themes)


def test_long_heatmaps_open_on_the_marked_cell() -> None:
    n = 300
    tokens = [f"w{i}" for i in range(n)]
    fig = heatmap_figure(torch.rand(n, n), tokens, rgb=FFN_RGB, value_name="x", mark=(250, 3))
    x_low, x_high = fig.layout.xaxis.range
    y_high, y_low = fig.layout.yaxis.range  # reversed: query 0 on top
    assert x_low < 3 < x_high and x_high - x_low == HEATMAP_WINDOW
    assert y_low < 250 < y_high and y_high - y_low == HEATMAP_WINDOW
    assert fig.data[0].customdata is None  # no T² hover labels for long prompts


def test_neurons_figure_colours_by_activation_sign() -> None:
    fig = neurons_figure([7, 3], [0.4, 0.2], [1.5, -0.3], selected=3)
    bar = fig.data[0]
    assert list(bar.marker.color) == [POSITIVE, NEGATIVE]
    assert list(bar.marker.line.width) == [0, 3]
    assert {t.name for t in fig.data[1:]} == {"activation > 0", "activation < 0"}
