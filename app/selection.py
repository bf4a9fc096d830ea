"""What the user clicked in the flow graph, as one string that fits in a URL.

The strings reuse the graph's node names (ARCHITECTURE.md, "Node and edge names"), so a link, the
JSON export and the figure's hover texts all speak the same language:

- ``X0_t``, ``A{l}_t``, ``I{l}_t``: a residual node (logit lens panel);
- ``M{l}_t``: an FFN block (neuron panel);
- ``{source}->A{l}_t``: an attention edge (heads panel). Residual and FFN *edges* are not
  selections of their own: a click on one selects the node or block it leads to.
- ``pos:t`` (figure only, never stored): the output position ``t`` was clicked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from llm_flow.engine.graph import node_id, source_id

Kind = Literal["residual", "ffn", "attention"]
POSITION_PREFIX = "pos:"

_NODE = re.compile(r"([XAIM])(\d+)_(\d+)")


@dataclass(frozen=True)
class Selection:
    """A parsed selection. ``source`` is the attention edge's source token (else ``None``)."""

    kind: Kind
    layer: int
    token: int
    source: int | None = None
    node: str = "X"  # X, A, I or M: the node letter of a residual node / FFN block

    @property
    def id(self) -> str:
        if self.kind == "attention" and self.source is not None:
            return f"{source_id(self.layer, self.source)}->{node_id('A', self.layer, self.token)}"
        return node_id(self.node, self.layer, self.token)


def attention_edge(layer: int, target: int, source: int) -> Selection:
    return Selection("attention", layer, target, source, "A")


def parse_selection(text: str | None, n_layers: int, n_tokens: int) -> Selection | None:
    """Parse a selection string; ``None`` when it is malformed or outside this graph.

    Checked against the graph's size because selections also arrive from URLs, which may be
    stale (another prompt) or hand-edited.
    """
    if not text:
        return None
    if "->" in text:
        source_text, target_text = text.split("->", 1)
        source, target = _node(source_text), _node(target_text)
        if source is None or target is None or target[0] != "A":
            return None
        layer, t = target[1], target[2]
        expected_source = source_id(layer, source[2])
        if source_text != expected_source or source[2] > t:
            return None
        selection = attention_edge(layer, t, source[2])
    else:
        parsed = _node(text)
        if parsed is None:
            return None
        letter, layer, t = parsed
        if letter == "X" and layer != 0:
            return None
        kind: Kind = "ffn" if letter == "M" else "residual"
        selection = Selection(kind, layer, t, None, letter)
    if selection.layer >= n_layers or selection.token >= n_tokens:
        return None
    return selection


def _node(text: str) -> tuple[str, int, int] | None:
    match = _NODE.fullmatch(text)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


def parse_position(text: str) -> int | None:
    """The position of a ``pos:t`` click, else ``None``."""
    if not text.startswith(POSITION_PREFIX):
        return None
    digits = text.removeprefix(POSITION_PREFIX)
    return int(digits) if digits.isdigit() else None


def clicked(event: Any) -> str | None:
    """The selection string of the first clicked point of a ``st.plotly_chart`` event.

    Streamlit's event looks like ``{"selection": {"points": [{"customdata": ..., "x": ...,
    ...}], "point_indices": [...], "box": [], "lasso": []}}``; ``customdata`` is what the figure
    attached to the point (a string here, or a list holding it). Points without a string
    (bars, lines) give ``None``.
    """
    if not isinstance(event, dict):
        return None
    selection = event.get("selection")
    points = selection.get("points", []) if isinstance(selection, dict) else []
    for point in points:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, list):
            data = data[0] if data else None
        if isinstance(data, str) and data:
            return data
    return None


def effect_selection(kind: str, layer: int, source: int, target: int) -> str:
    """The selection string of a row of the contrast effect table: a head's row selects its
    attention edge ``{source}->A{l}_t``, an FFN block's or neuron's row the block ``M{l}_t``."""
    if kind == "head":
        return attention_edge(layer, target, source).id
    return node_id("M", layer, target)


def selected_row(event: Any) -> int | None:
    """The first selected row of a ``st.dataframe`` selection event, like ``{"selection":
    {"rows": [3], "columns": [], "cells": []}}``; ``None`` when no row is selected."""
    if not isinstance(event, dict):
        return None
    selection = event.get("selection")
    rows = selection.get("rows", []) if isinstance(selection, dict) else []
    for row in rows:
        if isinstance(row, int):
            return row
    return None
