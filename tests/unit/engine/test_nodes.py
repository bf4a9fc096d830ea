"""Tests for llm_flow/engine/nodes.py: node and edge names round-trip, and nothing else parses."""

from __future__ import annotations

import pytest

from llm_flow.engine.nodes import (
    NODE_KINDS,
    NODE_WORDS,
    Node,
    attention_edge_id,
    node_id,
    parse_attention_edge,
    parse_node,
    previous_node,
    source_id,
)


@pytest.mark.parametrize("kind", ["X", "A", "M", "I"])
@pytest.mark.parametrize(("layer", "token"), [(0, 0), (3, 17), (29, 1023)])
def test_node_ids_round_trip(kind: str, layer: int, token: int) -> None:
    text = node_id(kind, layer, token)  # type: ignore[arg-type]
    node = parse_node(text)
    assert node is not None and node.id == text and node.token == token
    assert node.layer == (0 if kind == "X" else layer)  # embeddings have no layer
    assert node.is_residual == (kind != "M")


@pytest.mark.parametrize(
    "text", ["", "X1_0", "Q0_1", "A0", "A_1", "A0_1 ", "a0_1", "A-1_2", "A0_x", "I0_1->A1_1"]
)
def test_non_node_names_do_not_parse(text: str) -> None:
    assert parse_node(text) is None


def test_every_kind_has_a_json_name_and_words() -> None:
    assert set(NODE_KINDS) == set(NODE_WORDS) == {"X", "A", "M", "I"}
    assert NODE_KINDS == {
        "X": "embedding",
        "A": "after_attention",
        "M": "ffn",
        "I": "after_layer",
    }


@pytest.mark.parametrize(
    ("layer", "target", "source"), [(0, 0, 0), (0, 5, 2), (4, 9, 9), (7, 3, 0)]
)
def test_attention_edge_ids_round_trip(layer: int, target: int, source: int) -> None:
    text = attention_edge_id(layer, target, source)
    assert text == f"{source_id(layer, source)}->A{layer}_{target}"
    assert text.startswith("X0_" if layer == 0 else f"I{layer - 1}_")
    assert parse_attention_edge(text) == (layer, target, source)


@pytest.mark.parametrize(
    "text",
    [
        "I0_1->A0_3",  # layer 0 reads the embedding, not I
        "X0_1->A1_3",  # layer 1 reads I0
        "I1_1->A1_3",  # the source must be the layer below
        "I0_4->A1_3",  # causal: source after target
        "I0_1->M1_3",  # attention edges end in A
        "I0_1-A1_3",
        "A1_3",
    ],
)
def test_malformed_attention_edges_do_not_parse(text: str) -> None:
    assert parse_attention_edge(text) is None


def test_previous_node_walks_down_one_block() -> None:
    assert previous_node(Node("I", 3, 5)) == Node("A", 3, 5)
    assert previous_node(Node("M", 3, 5)) == Node("A", 3, 5)
    assert previous_node(Node("A", 3, 5)) == Node("I", 2, 5)
    assert previous_node(Node("A", 0, 5)) == Node("X", 0, 5)
    assert previous_node(Node("X", 0, 5)) is None
