"""Tests for app/figures.py: the pure figure builders, checked without a browser."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from app import figures
from app.selection import attention_edge, parse_position, parse_selection
from llm_flow.analyses.contrast import analyse_contrast
from llm_flow.analyses.faithfulness import FaithfulnessReport, Score
from llm_flow.analyses.interventions import Outcome, TokenProb
from llm_flow.analyses.lens import TokenScore
from llm_flow.engine.graph import FlowGraph, trace
from llm_flow.engine.routes import find_route, full_graph
from llm_flow.io.export import Prediction
from llm_flow.models.base import ModelRun
from tests.tiny import prompt, tiny_llm

Traced = tuple[ModelRun, FlowGraph, list[Prediction]]


@pytest.fixture(scope="module")
def traced() -> Traced:
    llm = tiny_llm("llama-gqa")
    run, graph = trace(llm, prompt(6))
    probs, ids = run.logits.softmax(-1).max(-1)
    strings = llm.token_strings(ids.tolist())
    predictions = [
        Prediction(token=s, id=i, prob=p)
        for s, i, p in zip(strings, ids.tolist(), probs.tolist(), strict=True)
    ]
    return run, graph, predictions


def _trace_with(fig: go.Figure, name: str) -> list[Any]:
    return [t for t in fig.data if t.name == name]


def _customdata(fig: go.Figure) -> list[str]:
    out: list[str] = []
    for t in fig.data:
        if t.customdata is not None and len(t.customdata) and isinstance(t.customdata[0], str):
            out += list(t.customdata)
    return out


def test_every_route_edge_and_block_is_clickable(traced: Traced) -> None:
    _, graph, predictions = traced
    route = find_route(graph, [-1], threshold=0.02, renormalize=True)
    fig = figures.flow_figure(graph, route, predictions, position=graph.n_tokens - 1)
    ids = _customdata(fig)
    edges = [i for i in ids if "->" in i]
    assert len(edges) == int(route.attention.sum()) > 0
    for edge in edges:  # each handle parses back to an attention edge that is on the route
        sel = parse_selection(edge, graph.n_layers, graph.n_tokens)
        assert sel is not None and sel.kind == "attention" and sel.source is not None
        assert bool(route.attention[sel.layer, sel.token, sel.source])
    blocks = [t for t in _trace_with(fig, "FFN block")][0].customdata
    assert sorted(blocks) == sorted(f"M{layer}_{t}" for layer, t in route.ffn.nonzero().tolist())
    # The output row: one marker per position, the chosen one labelled with its prediction.
    row = _trace_with(fig, "output position")[0]
    assert [parse_position(c) for c in row.customdata] == list(range(graph.n_tokens))
    assert row.text[-1] == figures.plotly_text(predictions[-1].token)
    assert all(text == "" for text in row.text[:-1])


def test_handles_are_invisible_but_lines_are_not(traced: Traced) -> None:
    _, graph, predictions = traced
    route = find_route(graph, [-1], threshold=0.02)
    fig = figures.flow_figure(graph, route, predictions, position=graph.n_tokens - 1)
    handles = [t for t in fig.data if t.customdata is not None and "->" in str(t.customdata[0])]
    assert handles and handles[0].marker.color == "rgba(0, 0, 0, 0)"
    lines = [t for t in fig.data if t.mode == "lines" and t.x is not None and len(t.x) > 1]
    assert lines and all(t.hoverinfo == "skip" for t in lines)  # clicks go to the handles


def test_edge_kinds_have_distinct_colours_and_width_grows_with_weight(traced: Traced) -> None:
    _, graph, predictions = traced
    fig = figures.flow_figure(graph, full_graph(graph), predictions, position=0)
    legend = {t.name: t.line.color for t in fig.data if t.name in ("attention", "FFN", "residual")}
    assert len(set(legend.values())) == 3
    widths = [figures._bin_style(figures.ATTENTION_RGB, b)[0] for b in range(8)]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    bins = figures.weight_bin(np.array([0.0, 0.01, 0.25, 1.0]))
    assert list(bins) == sorted(bins) and bins[-1] == figures.N_WEIGHT_BINS - 1


def test_selection_is_highlighted(traced: Traced) -> None:
    _, graph, predictions = traced
    route = find_route(graph, [-1], threshold=0.02)
    plain = figures.flow_figure(graph, route, predictions, position=graph.n_tokens - 1)
    for sel in (
        attention_edge(1, 3, 0),
        attention_edge(2, 4, 4),
        parse_selection("M1_2", graph.n_layers, graph.n_tokens),
        parse_selection("X0_1", graph.n_layers, graph.n_tokens),
        parse_selection("I2_5", graph.n_layers, graph.n_tokens),
    ):
        fig = figures.flow_figure(
            graph, route, predictions, position=graph.n_tokens - 1, selection=sel
        )
        rings = [t for t in fig.data if t.marker is not None and t.marker.symbol == "circle-open"]
        assert len(rings) == 1 and len(fig.data) > len(plain.data)


def test_labels_are_escaped_and_readable(traced: Traced) -> None:
    _, graph, predictions = traced
    fig = figures.flow_figure(graph, full_graph(graph), predictions, position=1)
    assert fig.layout.xaxis.ticktext[0] == "&lt;bos&gt;"  # plotly would eat a raw <bos>
    assert fig.layout.xaxis2.ticktext == fig.layout.xaxis.ticktext  # labels on top too
    assert figures.display_token("\n") == "↵"
    assert figures.display_token("  ") == "␣␣"
    assert figures.display_token("") == "∅"
    assert figures.table_token(" Paris") == "␣Paris"
    assert figures.markdown_text("$x_1$ **b**") == r"\$x\_1\$ \*\*b\*\*"
    assert figures.table_token("\ufffd", 1234) == "\ufffd #1234"  # partial UTF-8 byte tokens
    json.loads(fig.to_json())  # serializable as Streamlit sends it (NaN gaps become null)


def test_long_prompts_open_on_a_window_with_thinned_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 300
    low, high = figures.x_window(n, position=n - 1)
    assert high - low == pytest.approx(figures.MAX_VISIBLE_TOKENS)
    assert low < n - 1 < high
    low, high = figures.x_window(n, position=3)  # an early position stays in view
    assert low < 3 < high
    assert figures.x_window(10, position=9) == (-0.7, 9.6)
    monkeypatch.setattr(figures, "MAX_TICK_LABELS", 50)
    ticks, texts = figures._x_ticks([f"w{i}" for i in range(n)])
    assert len(ticks) <= 50 and len(ticks) == len(texts) and ticks[0] == 0
    assert figures.figure_height(30) > figures.figure_height(3)


def test_big_graphs_skip_the_off_route_grid(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, graph, predictions = traced
    route = find_route(graph, [-1])
    with_grid = figures.flow_figure(graph, route, predictions, position=graph.n_tokens - 1)
    assert _trace_with(with_grid, "residual (off route)")
    monkeypatch.setattr(figures, "MAX_GRID_NODES", 1)
    without = figures.flow_figure(graph, route, predictions, position=graph.n_tokens - 1)
    assert not _trace_with(without, "residual (off route)")


def test_heads_figure_sorts_and_marks_the_selected_head() -> None:
    fig = figures.heads_figure([0.1, 0.5, 0.2], selected=2)
    bar = fig.data[0]
    assert list(bar.x) == ["head 1", "head 2", "head 0"]
    assert list(bar.y) == [0.5, 0.2, 0.1]
    assert bar.marker.color[1] == figures.HIGHLIGHT
    assert bar.marker.color[0] != figures.HIGHLIGHT


def test_heatmap_blanks_the_future_and_outlines_the_edge() -> None:
    matrix = torch.rand(4, 4)
    fig = figures.heatmap_figure(
        matrix, ["a", "b", "<c>", "d"], rgb=figures.ATTENTION_RGB, value_name="x", mark=(3, 1)
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
    fig = figures.heatmap_figure(
        torch.rand(n, n), tokens, rgb=figures.FFN_RGB, value_name="x", mark=(250, 3)
    )
    x_low, x_high = fig.layout.xaxis.range
    y_high, y_low = fig.layout.yaxis.range  # reversed: query 0 on top
    assert x_low < 3 < x_high and x_high - x_low == figures.HEATMAP_WINDOW
    assert y_low < 250 < y_high and y_high - y_low == figures.HEATMAP_WINDOW
    assert fig.data[0].customdata is None  # no T² hover labels for long prompts


def test_neurons_figure_colours_by_activation_sign() -> None:
    fig = figures.neurons_figure([7, 3], [0.4, 0.2], [1.5, -0.3], selected=3)
    bar = fig.data[0]
    assert list(bar.marker.color) == [figures.POSITIVE, figures.NEGATIVE]
    assert list(bar.marker.line.width) == [0, 3]
    assert {t.name for t in fig.data[1:]} == {"activation > 0", "activation < 0"}


def test_token_tables() -> None:
    scores = [
        TokenScore(" Paris", 5, 3.0, 0.5, 4),
        TokenScore("\n", 6, 2.0, 0.25, -2),
        TokenScore("x", 7, 1.0, 0.1, 0),
    ]
    lens = figures.token_table(scores, lens=True)
    assert list(lens.columns) == ["token", "logit", "prob", "rank"]
    assert list(lens["token"]) == ["␣Paris", "↵", "x"]
    assert list(lens["rank"]) == ["↑4", "↓2", "="]
    plain = figures.token_table(scores)
    assert list(plain.columns) == ["token", "logit"]


# -- beyond the graph -------------------------------------------------------------------------


def test_effect_table_is_sorted_labelled_and_maps_rows_to_the_graph() -> None:
    llm = tiny_llm("llama-gqa")
    run, graph = trace(llm, prompt(6), keep_patterns=True)
    route = find_route(graph, [-1], threshold=0.0, renormalize=True)
    frame = analyse_contrast(llm, run, route, "w3", "w4").frame()
    table = figures.effect_table(frame, run.tokens)
    assert len(table) == len(frame) and list(table.index) == list(range(len(table)))
    strength = table[["direct_effect", "attribution"]].abs().max(axis=1)
    assert strength.is_monotonic_decreasing
    head = table[table["kind"] == "head"].iloc[0]
    assert head["tokens"] == (
        f"{figures.table_token(run.tokens[head['source']])} → "
        f"{figures.table_token(run.tokens[head['target']])}"
    )
    ids = figures.effect_ids(table)
    assert len(ids) == len(table)
    units = figures.effect_units(table)
    for kind, head, neuron, unit in zip(
        table["kind"], table["head"], table["neuron"], units, strict=True
    ):
        assert unit == {"head": head, "neuron": neuron}.get(kind)
    for (kind, layer, s, t), text in zip(
        table[["kind", "layer", "source", "target"]].itertuples(index=False), ids, strict=True
    ):
        sel = parse_selection(text, graph.n_layers, graph.n_tokens)
        assert sel is not None and (sel.layer, sel.token) == (layer, t)
        if kind == "head":  # the head's edge is on the route, so the graph can highlight it
            assert sel.source == s and bool(route.attention[layer, t, s])
        else:
            assert sel.kind == "ffn" and bool(route.ffn[layer, t])


def _score(value: float, share: float, heads: int = 2, ffn: int = 1) -> Score:
    return Score(ablated_heads=heads, ablated_ffn=ffn, value=value, share=share)


def test_faithfulness_table_rows() -> None:
    report = FaithfulnessReport(
        position=5,
        threshold=0.04,
        renormalize=True,
        mode="mean",
        metric="logit_diff",
        target=" Mary",
        distractor=" John",
        n_route_heads=2,
        n_route_ffn=1,
        total_heads=40,
        total_ffn=10,
        full=4.0,
        all_ablated=0.4,
        route=_score(1.0, 0.25, 38, 9),
        complement=_score(0.8, 0.2),
        route_heads=_score(1.2, 0.3, 2, 0),
        random=(_score(3.6, 0.9, 2, 0), _score(4.4, 1.1, 2, 0)),
        seeds=(0, 1),
    )
    table = figures.faithfulness_table(report)
    assert list(table.columns) == [
        "ablated",
        "head positions",
        "FFN blocks",
        "logit diff",
        "share of full",
    ]
    rows = table.set_index("ablated")
    assert rows.loc["nothing (full model)", "share of full"] == 1.0
    assert rows.loc["everything but the route", "head positions"] == 38
    assert rows.loc["as many random heads (2 draws)", "logit diff"] == pytest.approx(4.0)
    assert rows.loc["as many random heads (2 draws)", "share of full"] == pytest.approx(1.0)
    assert rows.loc["everything", "share of full"] == pytest.approx(0.1)


def test_top_tokens_table() -> None:
    result = Outcome(top=(TokenProb(" Mary", 5, 0.9), TokenProb("\ufffd", 7, 0.05)))
    table = figures.top_tokens_table(result)
    assert list(table["token"]) == ["␣Mary", "\ufffd #7"]
    assert list(table["prob"]) == [0.9, 0.05]


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
    matrix, labels = figures.frequency_matrix(_dataset_frame(), "last")
    assert labels == ["0", "1", "2", "FFN"]
    assert matrix.shape == (2, 4)
    assert matrix[1, 2] == pytest.approx(0.62) and matrix[0, 3] == pytest.approx(0.9)
    other, _ = figures.frequency_matrix(_dataset_frame(), "other")
    assert other[1, 2] == pytest.approx(0.12)


def test_frequency_figure_has_last_and_other_side_by_side() -> None:
    fig = figures.frequency_figure(_dataset_frame())
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["last token", "other tokens"]
    assert fig.layout.coloraxis.cmin == 0.0 and fig.layout.coloraxis.cmax == 1.0
    diff = _dataset_frame().rename(columns={"frequency": "frequency_diff"})
    diverging = figures.frequency_figure(diff, value="frequency_diff")
    assert diverging.layout.coloraxis.cmin == -1.0
    json.loads(fig.to_json())  # serializable for st.plotly_chart
