"""A route's nodes and edges by name, as lists of dicts: what the JSON contract prints and the
route diff compares (docs/architecture.md, "Node and edge names").

Masks cross to Python once per array (``nonzero().tolist()``); building the dicts is the only
per-edge Python.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from llm_flow.engine.nodes import NODE_KINDS, NodeKind, node_id, source_id
from llm_flow.engine.routes import Route, route_head_weights
from llm_flow.models.base import ModelRun


class EdgeEffects(Protocol):
    """Effects of the parts written at one output ``position`` (e.g. direct effects on a logit
    difference, :class:`llm_flow.analyses.contrast.DirectEffects`)."""

    @property
    def position(self) -> int: ...

    @property
    def heads(self) -> Tensor:
        """[L, S, H] the part of head h from source s in layer l."""

    @property
    def ffn(self) -> Tensor:
        """[L] each layer's whole FFN update."""


def route_nodes(route: Route) -> list[dict[str, Any]]:
    nodes = [
        {"id": node_id("X", 0, t), "layer": 0, "token": t, "kind": NODE_KINDS["X"]}
        for t in route.embeddings.nonzero().flatten().tolist()
    ]
    kinds: tuple[tuple[NodeKind, Tensor], ...] = (
        ("A", route.after_attention),
        ("M", route.ffn),
        ("I", route.after_layer),
    )
    for kind, mask in kinds:
        nodes += [
            {"id": node_id(kind, layer, t), "layer": layer, "token": t, "kind": NODE_KINDS[kind]}
            for layer, t in mask.nonzero().tolist()
        ]
    return nodes


def route_edges(
    route: Route, run: ModelRun | None = None, direct: EdgeEffects | None = None
) -> list[dict[str, Any]]:
    """Every edge on the route with its (thresholded, maybe renormalized) weight.

    With ``run`` (holding attention patterns), attention edges get per-head contributions; with
    ``direct``, attention and FFN edges get their direct effect on the logit difference.
    """
    idx, attention_weights = route.attention_edges()  # idx rows: (layer, target t, source s)
    weights = attention_weights.tolist()

    heads = route_head_weights(run, route)[1].tolist() if run is not None else None
    head_effects = None
    if direct is not None:
        at_output = (idx[:, 1] == direct.position)[:, None]
        head_effects = torch.where(at_output, direct.heads[idx[:, 0], idx[:, 2]], 0.0).tolist()
    edges: list[dict[str, Any]] = []
    for i, ((layer, t, s), weight) in enumerate(zip(idx.tolist(), weights, strict=True)):
        edge: dict[str, Any] = {
            "source": source_id(layer, s),
            "target": node_id("A", layer, t),
            "weight": weight,
            "kind": "attention",
        }
        if heads is not None:
            edge["heads"] = {str(h): v for h, v in enumerate(heads[i])}
        if head_effects is not None:
            edge["direct_effect"] = sum(head_effects[i])
            edge["head_direct_effects"] = {str(h): v for h, v in enumerate(head_effects[i])}
        edges.append(edge)
    ffn_effects = None if direct is None else direct.ffn.tolist()
    # (mask, weight, source kind, target kind, edge kind); None: the residual below layer l
    attn_res, ffn, ffn_res = (
        route.attn_residual_weights,
        route.ffn_weights,
        route.ffn_residual_weights,
    )
    others: tuple[tuple[Tensor, Tensor, NodeKind | None, NodeKind, str], ...] = (
        (route.attn_residual, attn_res, None, "A", "residual"),
        (route.ffn_residual, ffn_res, "A", "I", "residual"),
        (route.ffn, ffn, "A", "M", "ffn"),
        (route.ffn, ffn, "M", "I", "ffn"),
    )
    for mask, weight, src_kind, dst_kind, kind in others:
        pos = mask.nonzero()
        values = weight[pos[:, 0], pos[:, 1]].tolist()
        for (layer, t), value in zip(pos.tolist(), values, strict=True):
            src = source_id(layer, t) if src_kind is None else node_id(src_kind, layer, t)
            dst = node_id(dst_kind, layer, t)
            other: dict[str, Any] = {"source": src, "target": dst, "weight": value, "kind": kind}
            if kind == "ffn" and ffn_effects is not None and direct is not None:
                other["direct_effect"] = ffn_effects[layer] if t == direct.position else 0.0
            edges.append(other)
    return edges
