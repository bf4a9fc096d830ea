"""Tests for app/figures/dataset.py: dataset mode's frequency heatmaps."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from app.figures.dataset import frequency_figure, frequency_matrix


def _dataset_frame(n_layers: int = 2, n_heads: int = 3) -> pd.DataFrame:
    rows = []
    for layer in range(n_layers):
        for position_class in ("last", "other"):
            for head in range(n_heads):
                value = (layer * 10 + head) / 100 + (0.5 if position_class == "last" else 0)
                rows.append(("head", layer, head, position_class, value))
            rows.append(("ffn", layer, None, position_class, 0.9 - layer / 10))
    frame = pd.DataFrame(rows, columns=["kind", "layer", "head", "position_class", "frequency"])
    return frame.astype({"head": "Int64"})


def test_frequency_matrix_puts_heads_in_columns_and_the_ffn_last() -> None:
    matrix, labels = frequency_matrix(_dataset_frame(), "last")
    assert labels == ["0", "1", "2", "FFN"]
    assert matrix.shape == (2, 4)
    assert matrix[1, 2] == pytest.approx(0.62) and matrix[0, 3] == pytest.approx(0.9)
    other, _ = frequency_matrix(_dataset_frame(), "other")
    assert other[1, 2] == pytest.approx(0.12)


def test_frequency_figure_has_last_and_other_side_by_side() -> None:
    fig = frequency_figure(_dataset_frame())
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["last token", "other tokens"]
    assert fig.layout.coloraxis.cmin == 0.0 and fig.layout.coloraxis.cmax == 1.0
    diff = _dataset_frame().rename(columns={"frequency": "frequency_diff"})
    diverging = frequency_figure(diff, value="frequency_diff")
    assert diverging.layout.coloraxis.cmin == -1.0
    json.loads(fig.to_json())  # serializable for st.plotly_chart


def test_experts_follow_the_ffn_column_of_a_mixture_of_experts() -> None:
    from llm_flow.analyses.dataset import dataset_frequencies
    from tests.tiny import prompt, tiny_llm

    frame = dataset_frequencies(tiny_llm("qwen2-moe"), [prompt(5), prompt(6, 1)], threshold=0.0)
    matrix, labels = frequency_matrix(frame, "last")
    assert labels == ["0", "1", "2", "3", "FFN", "e0", "e1", "e2", "e3", "shared"]
    rows = frame[(frame["position_class"] == "last") & (frame["kind"] == "expert")]
    for layer, expert, frequency in zip(
        rows["layer"], rows["expert"], rows["frequency"], strict=True
    ):
        assert matrix[layer, 5 + expert] == pytest.approx(frequency)
    # At τ = 0 the last token's FFN node is on every route, and 2 experts per token are routed.
    assert (matrix[:, 4] == 1).all() and (matrix[:, 5:9].sum(1) >= 1).all()
