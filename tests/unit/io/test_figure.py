"""Tests for the core's route pictures, which are the app's graph: llm_flow/io/figure.py (with
llm_flow/io/layout.py, llm_flow/io/plot.py and llm_flow/io/text.py), checked without a browser."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from llm_flow.analyses.ablation import ablate
from llm_flow.analyses.interventions import Ablation, parse_heads
from llm_flow.engine.nodes import parse_attention_edge
from llm_flow.engine.routes import find_route, full_graph
from llm_flow.engine.trace import Trace, trace
from llm_flow.errors import InputError
from llm_flow.io import figure, layout, plot
from llm_flow.io.text import display_token, markdown_text, plotly_text
from tests.tiny import prompt, tiny_llm


@pytest.fixture(scope="module")
def traced() -> Trace:
    return trace(tiny_llm("llama-gqa"), prompt(6))


def _trace_with(fig: go.Figure, name: str) -> list[Any]:
    return [t for t in fig.data if t.name == name]


def _customdata(fig: go.Figure) -> list[str]:
    out: list[str] = []
    for t in fig.data:
        if t.customdata is not None and len(t.customdata) and isinstance(t.customdata[0], str):
            out += list(t.customdata)
    return out


def _last(tr: Trace) -> int:
    return tr.n_tokens - 1


def test_every_route_edge_and_block_is_clickable(traced: Trace) -> None:
    route = find_route(traced.graph, [-1], threshold=0.02, renormalize=True)
    fig = figure.flow_figure(traced, route, position=_last(traced))
    ids = _customdata(fig)
    edges = [i for i in ids if "->" in i]
    assert len(edges) == len(route.attention_idx) > 0
    for edge in edges:  # each handle parses back to an attention edge that is on the route
        parsed = parse_attention_edge(edge)
        assert parsed is not None and bool(route.contains(torch.tensor([parsed]))[0])
    (blocks,) = _trace_with(fig, "FFN block")
    pairs = route.ffn.nonzero().tolist()
    assert sorted(blocks.customdata) == sorted(f"M{layer}_{t}" for layer, t in pairs)
    # The FFN squares sit where the layout puts M nodes (one place for the geometry).
    first_layer, first_t = pairs[0]
    at = list(blocks.customdata).index(f"M{first_layer}_{first_t}")
    assert blocks.x[at] == pytest.approx(first_t + layout.FFN_OFFSET)
    assert blocks.y[at] == pytest.approx(2 * first_layer + 1.5)
    # The output row: one marker per position, the chosen one labelled with its prediction.
    (row,) = _trace_with(fig, "output position")
    assert [figure.parse_position(c) for c in row.customdata] == list(range(traced.n_tokens))
    assert row.text[-1] == plotly_text(traced.predictions[-1].token)
    assert all(text == " " for text in row.text[:-1])  # blank, yet a text element
    assert "FFN block" in blocks.hovertext[at] and f"layer {first_layer} · " in blocks.hovertext[at]


def test_a_route_node_names_the_residual_edge_into_it(traced: Trace) -> None:
    """Residual edges have no click handles (they made each browser redraw ~40 % slower): the
    node they lead to names their weight, and only attention edges have handles."""
    route = find_route(traced.graph, [-1], threshold=0.02, renormalize=True)
    fig = figure.flow_figure(traced, route, position=_last(traced))
    (nodes,) = _trace_with(fig, "residual node")
    (after_attention,) = _trace_with(fig, "residual node after attention")
    assert all(i.startswith("A") for i in after_attention.customdata)
    assert not any(i.startswith("A") for i in nodes.customdata)
    assert (after_attention.marker.size, nodes.marker.size) == (5, 8)
    ids = [*after_attention.customdata, *nodes.customdata]
    hovers = [*after_attention.hovertext, *nodes.hovertext]
    text = dict(zip(ids, hovers, strict=True))
    named = 0
    for kind, mask, weights in (
        ("A", route.attn_residual, route.attn_residual_weights),
        ("I", route.ffn_residual, route.ffn_residual_weights),
    ):
        for layer, t in mask.nonzero().tolist():
            node = f"{kind}{layer}_{t}"
            assert f"residual in: weight {float(weights[layer, t]):.3f}" in text[node]
            named += 1
    assert named > 0
    assert sum("residual in" in h for h in hovers) == named
    invisible = [t for t in fig.data if t.marker.color == plot.INVISIBLE]
    assert [t.legendgroup for t in invisible] == ["attention"]


def test_positions_of_output_marker_clicks() -> None:
    assert figure.parse_position("pos:12") == 12
    assert figure.parse_position("pos:x") is None
    assert figure.parse_position("A0_1") is None


def test_handles_are_invisible_but_lines_are_not(traced: Trace) -> None:
    route = find_route(traced.graph, [-1], threshold=0.02)
    fig = figure.flow_figure(traced, route, position=_last(traced))
    handles = [t for t in fig.data if t.customdata is not None and "->" in str(t.customdata[0])]
    assert handles and handles[0].marker.color == plot.INVISIBLE
    lines = [t for t in fig.data if t.mode == "lines" and t.x is not None and len(t.x) > 1]
    assert lines and all(t.hoverinfo == "skip" for t in lines)  # clicks go to the handles


def test_edge_kinds_have_distinct_colours_and_width_grows_with_weight(traced: Trace) -> None:
    fig = figure.flow_figure(traced, full_graph(traced.graph), position=0)
    legend = {t.name: t.line.color for t in fig.data if t.name in ("attention", "FFN", "residual")}
    assert len(set(legend.values())) == 3
    widths = [plot.bin_style(plot.ATTENTION_RGB, b)[0] for b in range(plot.N_WEIGHT_BINS)]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    bins = plot.weight_bin(np.array([0.0, 0.01, 0.25, 1.0]))
    assert list(bins) == sorted(bins) and bins[-1] == plot.N_WEIGHT_BINS - 1


@pytest.mark.parametrize(
    ("selected", "where"),
    [
        # An edge: a ring on each end (issue 12: a ring at the click handle, a fixed share of
        # the way along a long edge, sat on a third token's column).
        ("I0_0->A1_3", [(0.0, 2.0), (3.0, 3.0)]),
        ("I1_4->A2_4", [(4 - layout.SELF_BOW, 4.5)]),  # the s = t edge: on its bow
        ("M1_2", [(2 + layout.FFN_OFFSET, 3.5)]),
        ("X0_1", [(1.0, 0.0)]),
        ("A2_3", [(3.0, 5.0)]),
        ("I2_5", [(5.0, 6.0)]),
    ],
)
def test_the_selection_is_highlighted_where_it_is_drawn(
    traced: Trace, selected: str, where: list[tuple[float, float]]
) -> None:
    route = find_route(traced.graph, [-1], threshold=0.02)
    plain = figure.flow_figure(traced, route, position=_last(traced))
    fig = figure.flow_figure(traced, route, position=_last(traced), selected=selected)
    rings = [t for t in fig.data if t.marker is not None and t.marker.symbol == "circle-open"]
    assert len(rings) == 1 and len(fig.data) > len(plain.data)
    assert list(rings[0].x) == pytest.approx([x for x, _ in where])
    assert list(rings[0].y) == pytest.approx([y for _, y in where])
    if "->" in selected:  # the edge itself is traced in red, ending at its A node
        (line,) = [t for t in fig.data if t.mode == "lines" and t.line.color == plot.HIGHLIGHT]
        assert line.y[-1] == pytest.approx(where[-1][1] // 1 + (1 if len(where) == 1 else 0))


@pytest.mark.parametrize("selected", ["A9_0", "I0_99", "X0_1->A1_3", "bogus", "pos:1"])
def test_a_selection_outside_the_graph_is_refused(traced: Trace, selected: str) -> None:
    route = find_route(traced.graph, [-1])
    with pytest.raises(InputError, match="not a node or attention edge of this graph"):
        figure.flow_figure(traced, route, position=_last(traced), selected=selected)


def test_labels_are_escaped_and_readable(traced: Trace) -> None:
    fig = figure.flow_figure(traced, full_graph(traced.graph), position=1)
    assert fig.layout.xaxis.ticktext[0] == "&lt;bos&gt;"  # plotly would eat a raw <bos>
    assert "xaxis2" not in fig.to_plotly_json()["layout"]  # one label row: cheaper to draw
    assert list(fig.layout.yaxis.ticktext) == ["emb", "0", "1", "2", "out"]
    assert display_token("\n") == "↵"
    assert display_token("  ") == "␣␣"
    assert display_token("") == "∅"
    assert markdown_text("$x_1$ **b**") == r"\$x\_1\$ \*\*b\*\*"
    json.loads(fig.to_json())  # serializable as Streamlit sends it (NaN gaps become null)


def test_long_full_views_open_on_a_window_labelled_by_what_is_visible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 427
    full = layout.all_columns(n)
    low, high = layout.x_window(full, position=n - 1)
    assert high - low == pytest.approx(layout.MAX_VISIBLE_TOKENS)
    assert low < n - 1 < high
    low, high = layout.x_window(full, position=3)  # an early position stays in view
    assert low < 3 < high
    assert layout.x_window(layout.all_columns(10), position=9) == (-0.7, 9.6)
    # Labels are thinned by the 40 tokens in view, not by the whole prompt: 425 has one (issue 12).
    ticks = layout.token_ticks(full, position=n - 1)
    assert {425, 426} <= set(ticks) and set(range(n - 40, n)) <= set(ticks)
    monkeypatch.setattr(layout, "MAX_TICK_LABELS", 10)
    ticks = layout.token_ticks(full, position=n - 2)
    assert len(ticks) <= n // 4 + 2 and ticks[0] == 0 and n - 2 in ticks
    monkeypatch.setattr(layout, "MAX_AXIS_LABELS", 50)
    ticks, texts = plot.token_labels([f"w{i}" for i in range(300)])  # panels' heatmaps
    assert len(ticks) <= 50 and len(ticks) == len(texts) and ticks[0] == 0
    assert layout.figure_height(30) > layout.figure_height(3)
    assert layout.figure_height(30) <= layout.FIT_HEIGHT  # a laptop window holds the whole graph


def test_compact_columns_pack_the_shown_tokens_and_mark_the_gaps() -> None:
    cols = layout.compact_columns([425, 3, 4, 282, 3, 426], 427)
    assert cols.tokens == (3, 4, 282, 425, 426) and cols.compact
    assert cols.of([3, 4, 282, 425, 426]).tolist() == [0, 1, 2, 3, 4]
    assert np.isnan(cols.x[5]) and np.isnan(cols.x[0])
    gaps = [(g.x, g.first, g.last, g.size) for g in cols.gaps]
    assert gaps == [(-0.5, 0, 2, 3), (1.5, 5, 281, 277), (2.5, 283, 424, 142)]
    assert layout.x_window(cols, position=426) == (-0.7, 4.6)  # every column in view
    trailing = layout.compact_columns([0, 2], 5)
    assert [(g.first, g.last) for g in trailing.gaps] == [(1, 1), (3, 4)]
    assert not layout.compact_columns(range(5), 5).gaps
    assert not layout.compact_columns(range(5), 5).compact
    with pytest.raises(ValueError, match="0 … 4"):
        layout.compact_columns([5], 5)


def test_the_compact_view_draws_only_the_route_tokens() -> None:
    traced = trace(tiny_llm("llama-gqa"), prompt(12))
    route = find_route(traced.graph, [5], threshold=0.02, renormalize=True)
    shown = figure.route_tokens(route).tolist()
    assert shown == [0, 1, 3, 5]  # gaps inside the route and after the position
    fig = figure.flow_figure(traced, route, position=5, compact=True)
    xs = np.concatenate([np.asarray(t.x, dtype=float) for t in fig.data if t.x is not None])
    xs = xs[~np.isnan(xs)]
    assert xs.min() >= -1 and xs.max() <= len(shown)  # all on the packed columns
    (outputs,) = _trace_with(fig, "output position")
    assert list(outputs.customdata) == [f"pos:{t}" for t in shown]
    assert outputs.x == (0, 1, 2, 3)
    assert fig.layout.xaxis.range == (-0.7, len(shown) - 0.4)
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    marks = _trace_with(fig, "hidden tokens")
    assert [text.split(": ")[1] for text in marks[-1].hovertext] == ["2", "4", f"6–{_last(traced)}"]
    # Every edge's click handle still names the original tokens.
    edges = [i for i in _customdata(fig) if "->" in i]
    assert len(edges) == len(route.attention_idx)
    # The full view of the same route keeps every token; short prompts default to it.
    full = figure.flow_figure(traced, route, position=5)
    (outputs,) = _trace_with(full, "output position")
    assert len(outputs.customdata) == traced.n_tokens and not _trace_with(full, "hidden tokens")
    # A selection off the route gets its column, so its ring is drawn.
    off = next(t for t in range(traced.n_tokens) if t not in shown)
    ringed = figure.flow_figure(traced, route, position=5, compact=True, selected=f"I0_{off}")
    (outputs,) = _trace_with(ringed, "output position")
    assert f"pos:{off}" in outputs.customdata


def test_big_graphs_skip_the_off_route_grid(traced: Trace, monkeypatch: pytest.MonkeyPatch) -> None:
    route = find_route(traced.graph, [-1])
    with_grid = figure.flow_figure(traced, route, position=_last(traced))
    assert _trace_with(with_grid, "residual (off route)")
    monkeypatch.setattr(figure, "MAX_GRID_NODES", 1)
    without = figure.flow_figure(traced, route, position=_last(traced))
    assert not _trace_with(without, "residual (off route)")


def test_the_route_diff_colours_each_status_and_hovers_before_and_after(traced: Trace) -> None:
    heads = parse_heads("0.0, 0.1, 0.2, 0.3")
    diff = ablate(traced, Ablation(heads=heads), traced=True).route_diff(0.02)
    fig = figure.diff_figure(diff, position=_last(traced))
    counts = diff.to_dict()["n_edges"]
    legend = [t.name for t in fig.data if t.showlegend is not False and t.name]
    kept = diff.kept_by_shift()
    assert legend == [
        f"kept, weakened ≥ 2× ({kept['weakened'].n_edges})",
        f"kept, similar ({kept['similar'].n_edges})",
        f"kept, strengthened ≥ 2× ({kept['strengthened'].n_edges})",
        *(f"{s} ({diff.part(s).n_edges})" for s in ("lost", "gained")),
    ]
    # issue 12: kept edges that changed are coloured apart (diverging scale), not all grey
    colours = {t.legendgroup: t.line.color for t in fig.data if t.showlegend is not False}
    assert len({colours[f"kept-{s}"] for s in ("weakened", "similar", "strengthened")}) == 3
    assert counts["lost"] + counts["gained"] > 0
    (handles,) = [t for t in fig.data if t.legendgroup == "handles"]
    n_attention = sum(len(diff.part(s).attention_idx) for s in ("kept", "lost", "gained"))
    n_ffn = sum(int(diff.part(s).ffn.sum()) for s in ("kept", "lost", "gained"))
    assert len(handles.x) == n_attention + n_ffn
    assert all(" → " in text for text in handles.hovertext)
    json.loads(fig.to_json())


def test_crossing_y_follows_each_polyline() -> None:
    points = layout.attention_points([1, 1], [10, 4], [0, 4])  # a long edge and an s = t edge
    y = layout.crossing_y(points, 2.5)
    # The long edge: from (0, 2) via (5, 2.5) to (10, 3); the s = t edge never reaches x = 2.5.
    assert y[0] == pytest.approx(2.25) and np.isnan(y[1])


def test_a_full_view_labels_edges_from_sources_left_of_its_window() -> None:
    traced = trace(tiny_llm("llama-gqa"), prompt(50))
    route = find_route(traced.graph, [-1], threshold=0.005, renormalize=True)
    fig = figure.flow_figure(traced, route, position=_last(traced), compact=False)
    low = fig.layout.xaxis.range[0]
    assert low > 0  # the full view opens on a window
    (labels,) = _trace_with(fig, "off-screen sources")
    sources = [int(text.removeprefix("←")) for text in labels.text]
    idx = route.attention_idx.numpy()
    pairs = list(zip(idx[:, 2].tolist(), idx[:, 1].tolist(), strict=True))
    entering = [s for s, t in pairs if s < low + 0.35 < t]  # source off screen, target on
    assert sources and set(sources) <= set(entering)
    assert len(sources) == min(len(entering), figure.MAX_SOURCE_LABELS)
    assert all(x > low for x in labels.x)  # on screen, where each edge enters
    default = figure.flow_figure(traced, route, position=_last(traced))  # 51 tokens: full view
    assert _trace_with(default, "off-screen sources")
    packed = figure.flow_figure(traced, route, position=_last(traced), compact=True)
    assert not _trace_with(packed, "off-screen sources")  # every source has its column
