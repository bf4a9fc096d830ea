"""Tests for app/figures/tables.py: the explorer's tables as pandas frames."""

from __future__ import annotations

import pytest
import torch

from app.figures.tables import (
    B_DEC,
    DIFF_COLUMN,
    ERROR,
    effect_ids,
    effect_table,
    effect_units,
    faithfulness_table,
    latents_table,
    route_diff_table,
    table_token,
    token_table,
    top_tokens_table,
)
from app.selection import parse_selection
from llm_flow.analyses.ablation import Outcome, TokenProb
from llm_flow.analyses.contrast import analyse_contrast
from llm_flow.analyses.faithfulness import FaithfulnessReport, Score
from llm_flow.analyses.latents import Latent, Latents
from llm_flow.analyses.lens import TokenScore
from llm_flow.analyses.route_diff import EdgeChange
from llm_flow.engine.routes import find_route
from llm_flow.engine.trace import trace
from tests.tiny import prompt, tiny_llm


def test_table_tokens_show_spaces_and_partial_characters() -> None:
    assert table_token(" Paris") == "␣Paris"
    assert table_token("\ufffd", 1234) == "\ufffd #1234"  # partial UTF-8 byte tokens
    assert table_token("\ufffd") == "\ufffd"


def test_token_tables() -> None:
    scores = [
        TokenScore(" Paris", 5, 3.0, 0.5, 4),
        TokenScore("\n", 6, 2.0, 0.25, -2),
        TokenScore("x", 7, 1.0, 0.1, 0),
    ]
    lens = token_table(scores, lens=True)
    assert list(lens.columns) == ["token", "logit", "prob", "rank"]
    assert list(lens["token"]) == ["␣Paris", "↵", "x"]
    assert list(lens["rank"]) == ["↑4", "↓2", "="]
    plain = token_table(scores)
    assert list(plain.columns) == ["token", "logit"]


def test_effect_table_is_sorted_labelled_and_maps_rows_to_the_graph() -> None:
    traced = trace(tiny_llm("llama-gqa"), prompt(6))
    graph, tokens = traced.graph, traced.tokens
    route = find_route(graph, [-1], threshold=0.0, renormalize=True)
    frame = analyse_contrast(traced, route, "w3", "w4").frame()
    table = effect_table(frame, tokens)
    assert len(table) == len(frame) and list(table.index) == list(range(len(table)))
    strength = table[["direct_effect", "attribution"]].abs().max(axis=1)
    assert strength.is_monotonic_decreasing
    head = table[table["kind"] == "head"].iloc[0]
    assert head["tokens"] == (
        f"{table_token(tokens[head['source']])} → {table_token(tokens[head['target']])}"
    )
    ids = effect_ids(table)
    assert len(ids) == len(table)
    units = effect_units(table)
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
            assert sel.source == s and bool(route.contains(torch.tensor([[layer, t, s]]))[0])
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
    table = faithfulness_table(report)
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
    table = top_tokens_table(result)
    assert list(table["token"]) == ["␣Mary", "\ufffd #7"]
    assert list(table["prob"]) == [0.9, 0.05]


def test_route_diff_table_names_the_tokens_each_edge_connects() -> None:
    edges = [
        EdgeChange("I0_1", "A1_3", "attention", "lost", 0.5, 0.0),
        EdgeChange("A1_3", "M1_3", "ffn", "kept", 0.2, 0.3),
        EdgeChange("I0_2", "A1_3", "attention", "kept", 0.306, 0.056),
        EdgeChange("I0_3", "A1_3", "attention", "kept", 0.1, 0.2),
    ]
    table = route_diff_table(edges, ["<bos>", " a", "b", " c"])
    assert list(table["edge"]) == ["I0_1 → A1_3", "A1_3 → M1_3", "I0_2 → A1_3", "I0_3 → A1_3"]
    assert list(table["tokens"]) == ["␣a → ␣c", "␣c", "b → ␣c", "␣c → ␣c"]
    assert list(table["change"]) == pytest.approx([-0.5, 0.1, -0.25, 0.1])
    # A kept edge says how it moved (factor 2), as the diff figure colours it.
    assert list(table["shift"]) == ["", "similar", "weakened", "strengthened"]
    assert list(route_diff_table(edges, ["<bos>", " a", "b", " c"], factor=1.4)["shift"]) == [
        "",
        "strengthened",
        "weakened",
        "strengthened",
    ]


def test_expert_rows_map_to_their_expert() -> None:
    traced = trace(tiny_llm("qwen2-moe"), prompt(6))
    route = find_route(traced.graph, [-1], threshold=0.0, renormalize=True)
    table = effect_table(analyse_contrast(traced, route, "w3", "w4").frame(), traced.tokens)
    units = effect_units(table)
    kinds = set(table["kind"])
    assert {"expert", "shared_expert"} <= kinds and "neuron" not in kinds
    for kind, expert, unit in zip(table["kind"], table["expert"], units, strict=True):
        assert unit == (int(expert) if kind == "expert" else unit)
        if kind == "shared_expert":
            assert unit is None


def test_small_route_weight_large_effect_is_flagged() -> None:
    """Issue 12: head 23.3 had weight 0.003 and direct effect +2.87; nothing said so."""
    from app.figures.tables import FLAG
    from llm_flow.analyses.contrast import small_weight_large_effect

    assert small_weight_large_effect(0.003, 2.87, 0.0, 0.04, 3.0)
    assert not small_weight_large_effect(0.3, 2.87, 0.0, 0.04, 3.0)  # on the route: not news
    assert not small_weight_large_effect(0.003, 0.01, 0.02, 0.04, 3.0)  # small effect
    assert not small_weight_large_effect(None, 5.0, 5.0, 0.04, 3.0)  # neurons have no weight
    assert small_weight_large_effect(0.003, 0.0, -0.5, 0.04, 3.0)  # attribution counts, |·|

    traced = trace(tiny_llm("llama-gqa"), prompt(6))
    route = find_route(traced.graph, [-1], threshold=0.0, renormalize=True)
    analysis = analyse_contrast(traced, route, "w3", "w4")
    frame = analysis.frame()
    assert FLAG not in effect_table(frame, traced.tokens).columns
    # τ above every weight: exactly the rows with a weight and a large effect are flagged
    table = effect_table(frame, traced.tokens, 2.0, analysis.contrast.logit_diff)
    large = table[["direct_effect", "attribution"]].abs().max(axis=1) >= 0.1 * abs(
        analysis.contrast.logit_diff
    )
    assert list(table[FLAG]) == list(large & table["weight"].notna())
    assert table[FLAG].any()


def test_latents_table_lists_the_rest_b_dec_and_the_error() -> None:
    shown = [
        Latent(7, 2.0, 0.4, 1.5, -0.5, (" a", "b"), ("c",)),
        Latent(3, 1.0, 0.2, -0.25, 0.75, (), ()),
    ]
    result = Latents(
        node="I1_2",
        hook="blocks.1.hook_resid_post",
        predicted_token=" a",
        latents=tuple(shown),
        latents_contribution=0.7,
        b_dec_contribution=0.1,
        error_contribution=0.2,
        b_dec_direct_effect=0.05,
        error_direct_effect=-0.125,
        explained_variance=0.9,
        l0=5,
    )
    table = latents_table(result, contrast=True)
    assert list(table["latent"]) == ["7", "3", "3 other active", B_DEC, ERROR]
    assert list(table["contribution"]) == pytest.approx([0.4, 0.2, 0.1, 0.1, 0.2])
    assert list(table["direct effect"].iloc[[0, 1, 3, 4]]) == [1.5, -0.25, 0.05, -0.125]
    assert list(table[DIFF_COLUMN].iloc[:2]) == [-0.5, 0.75]
    assert table["promotes"].iloc[0] == "␣a b"
    assert DIFF_COLUMN not in latents_table(result, contrast=False).columns
    every = Latents(**{**result.__dict__, "l0": 2, "latents_contribution": 0.6})
    assert list(latents_table(every, contrast=False)["latent"]) == ["7", "3", B_DEC, ERROR]
