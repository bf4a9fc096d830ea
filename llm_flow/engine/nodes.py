"""Names of the flow graph's nodes and edges: the one place that formats and parses them.

The JSON contract, the app's selections and URLs, the figure's hover texts and the logit lens
all speak these names (docs/architecture.md, "Node and edge names"):

- ``X0_t`` the embedding of token t (always layer 0);
- ``A{l}_t`` the residual after the attention of layer l;
- ``M{l}_t`` the FFN block of layer l at token t (a block, not a residual state);
- ``I{l}_t`` the residual after layer l (the output node of position t is ``I{L-1}_t``);
- ``{source}->A{l}_t`` the attention edge from ``source`` (``X0_s`` for layer 0, else
  ``I{l-1}_s``) into ``A{l}_t``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

NodeKind = Literal["X", "A", "M", "I"]
# The ``kind`` field of the JSON contract's nodes.
NODE_KINDS: dict[NodeKind, str] = {
    "X": "embedding",
    "A": "after_attention",
    "M": "ffn",
    "I": "after_layer",
}
# How a person reads each kind (hover texts, panel headings).
NODE_WORDS: dict[NodeKind, str] = {
    "X": "embedding",
    "A": "residual after attention",
    "M": "FFN block",
    "I": "residual after the layer",
}
EDGE_ARROW = "->"


def describe_node(kind: NodeKind, layer: int) -> str:
    """A node in words with its layer said once ("the residual after layer 29", never "the
    residual after the layer of layer 29")."""
    return {
        "X": "the embedding",
        "A": f"the residual after layer {layer}'s attention",
        "M": f"layer {layer}'s FFN block",
        "I": f"the residual after layer {layer}",
    }[kind]


_NODE = re.compile(r"([XAMI])(\d+)_(\d+)")


@dataclass(frozen=True)
class Node:
    """A node of the flow graph; ``layer`` is 0 for embeddings."""

    kind: NodeKind
    layer: int
    token: int

    @property
    def id(self) -> str:
        return node_id(self.kind, self.layer, self.token)

    @property
    def is_residual(self) -> bool:
        """A residual state (X, A, I), as opposed to the FFN block M."""
        return self.kind != "M"


def node_id(kind: NodeKind, layer: int, token: int) -> str:
    """``kind`` is one of X, A, M, I; embeddings have no layer index (always ``X0``)."""
    return f"X0_{token}" if kind == "X" else f"{kind}{layer}_{token}"


def source_id(layer: int, token: int) -> str:
    """The residual node an attention or residual edge into layer ``layer`` starts from."""
    return node_id("X", 0, token) if layer == 0 else node_id("I", layer - 1, token)


def attention_edge_id(layer: int, target: int, source: int) -> str:
    """``{source}->A{l}_t``: the attention edge from token ``source`` to ``target`` in
    ``layer``."""
    return f"{source_id(layer, source)}{EDGE_ARROW}{node_id('A', layer, target)}"


def parse_node(text: str) -> Node | None:
    """The node named ``text``, or ``None`` when it is not a node name (syntax only: the caller
    checks the layer and token against its graph)."""
    match = _NODE.fullmatch(text)
    if match is None:
        return None
    letter, layer, token = match.group(1), int(match.group(2)), int(match.group(3))
    if letter == "X" and layer != 0:
        return None
    kinds: dict[str, NodeKind] = {"X": "X", "A": "A", "M": "M", "I": "I"}
    return Node(kinds[letter], layer, token)


def parse_attention_edge(text: str) -> tuple[int, int, int] | None:
    """``(layer, target, source)`` of an attention edge id, or ``None`` when ``text`` is not
    one (a causal edge: source ≤ target, from the node :func:`source_id` names)."""
    if EDGE_ARROW not in text:
        return None
    source_text, target_text = text.split(EDGE_ARROW, 1)
    source, target = parse_node(source_text), parse_node(target_text)
    if source is None or target is None or target.kind != "A":
        return None
    if source_text != source_id(target.layer, source.token) or source.token > target.token:
        return None
    return target.layer, target.token, source.token


def previous_node(node: Node) -> Node | None:
    """The residual node just below a residual ``node`` at the same token: ``A{l}_t`` →
    ``I{l-1}_t`` (``X0_t`` for l = 0), ``I{l}_t`` → ``A{l}_t``, ``X0_t`` → None. The FFN block
    ``M{l}_t`` reads from ``A{l}_t``."""
    t = node.token
    if node.kind == "X":
        return None
    if node.kind in ("I", "M"):
        return Node("A", node.layer, t)
    return Node("X", 0, t) if node.layer == 0 else Node("I", node.layer - 1, t)
