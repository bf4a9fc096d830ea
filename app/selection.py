"""What the user clicked in the flow graph, as one string that fits in a URL.

The strings are the graph's node and edge ids (:mod:`llm_flow.engine.nodes`), so a link, the
JSON export and the figure's hover texts all speak the same language:

- ``X0_t``, ``A{l}_t``, ``I{l}_t``: a residual node (logit lens panel);
- ``M{l}_t``: an FFN block (neuron panel);
- ``{source}->A{l}_t``: an attention edge (heads panel). Residual and FFN *edges* are not
  selections of their own: a click on one selects the node or block it leads to.

An output marker's ``pos:t`` is a click too, but never a selection
(:func:`llm_flow.io.figure.parse_position`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llm_flow.engine.nodes import (
    NodeKind,
    attention_edge_id,
    node_id,
    parse_attention_edge,
    parse_node,
)

Kind = Literal["residual", "ffn", "attention"]


@dataclass(frozen=True)
class Selection:
    """A parsed selection: a residual node or FFN block ``node`` of ``layer`` at ``token``, or
    the attention edge from ``source`` into ``A{layer}_{token}``."""

    kind: Kind
    layer: int
    token: int
    source: int | None = None
    node: NodeKind = "A"

    @property
    def id(self) -> str:
        if self.source is not None:
            return attention_edge_id(self.layer, self.token, self.source)
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
    edge = parse_attention_edge(text)
    if edge is not None:
        selection = attention_edge(*edge)
    else:
        node = parse_node(text)
        if node is None:
            return None
        kind: Kind = "residual" if node.is_residual else "ffn"
        selection = Selection(kind, node.layer, node.token, None, node.kind)
    if selection.layer >= n_layers or selection.token >= n_tokens:
        return None
    return selection


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
        return attention_edge_id(layer, target, source)
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
