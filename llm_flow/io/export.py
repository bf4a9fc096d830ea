"""Export a route (or the full graph) as the CLI's JSON contract, a networkx graph, or GraphML.

The JSON object (ARCHITECTURE.md, "CLI contract")::

    {"model", "tokens", "token_ids", "n_layers", "threshold", "renormalize", "position",
     "prediction": {"token", "id", "prob"},
     "nodes": [{"id", "layer", "token", "kind"}],
     "edges": [{"source", "target", "weight", "kind", "heads"?: {"<h>": float}}]}

With a target/distractor pair (``llm-flow graph --target … --distractor …``) the object also has
``"contrast": {"target", "distractor", "logit_diff", …}``, and attention and FFN edges carry
``"direct_effect"`` (their direct effect on the logit difference; 0 unless the edge ends at the
output position, see :mod:`llm_flow.analyses.contrast`); attention edges also carry
``"head_direct_effects": {"<h>": float}``. Residual edges carry no direct effect (a residual
connection is not a component).

Masks cross to Python once per array (``nonzero().tolist()``); building the output dicts is the
only per-edge Python.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch

from llm_flow.analyses.contrast import Contrast, DirectEffects
from llm_flow.engine.graph import (
    NODE_KINDS,
    FlowGraph,
    layer_head_contributions,
    node_id,
    source_id,
)
from llm_flow.engine.routes import Route
from llm_flow.models.base import ModelRun, TransparentLlm


@dataclass(frozen=True)
class Prediction:
    token: str
    id: int
    prob: float

    @classmethod
    def of(cls, llm: TransparentLlm, run: ModelRun, position: int) -> Prediction:
        """The greedy next token after ``position`` and its probability."""
        prob, idx = run.logits[position].float().softmax(-1).max(-1)
        return cls(token=llm.token_strings([int(idx)])[0], id=int(idx), prob=float(prob))


def route_nodes(route: Route) -> list[dict[str, Any]]:
    nodes = [
        {"id": node_id("X", 0, t), "layer": 0, "token": t, "kind": NODE_KINDS["X"]}
        for t in route.embeddings.nonzero().flatten().tolist()
    ]
    for kind, mask in (("A", route.after_attention), ("M", route.ffn), ("I", route.after_layer)):
        nodes += [
            {"id": node_id(kind, layer, t), "layer": layer, "token": t, "kind": NODE_KINDS[kind]}
            for layer, t in mask.nonzero().tolist()
        ]
    return nodes


def route_edges(
    route: Route, run: ModelRun | None = None, direct: DirectEffects | None = None
) -> list[dict[str, Any]]:
    """Every edge on the route with its (thresholded, maybe renormalized) weight.

    With ``run`` (holding attention patterns), attention edges get per-head contributions; with
    ``direct``, attention and FFN edges get their direct effect on the logit difference.
    """
    idx, attention_weights = route.attention_edges()  # idx rows: (layer, target t, source s)
    weights = attention_weights.tolist()

    heads = _edge_heads(route, idx, run) if run is not None else None
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
    # (mask, weight, source kind, target kind, edge kind); "I-" is the residual below layer l
    attn_res, ffn, ffn_res = (
        route.attn_residual_weights,
        route.ffn_weights,
        route.ffn_residual_weights,
    )
    for mask, weight, src_kind, dst_kind, kind in (
        (route.attn_residual, attn_res, "I-", "A", "residual"),
        (route.ffn_residual, ffn_res, "A", "I", "residual"),
        (route.ffn, ffn, "A", "M", "ffn"),
        (route.ffn, ffn, "M", "I", "ffn"),
    ):
        pos = mask.nonzero()
        values = weight[pos[:, 0], pos[:, 1]].tolist()
        for (layer, t), value in zip(pos.tolist(), values, strict=True):
            src = source_id(layer, t) if src_kind == "I-" else node_id(src_kind, layer, t)
            dst = node_id(dst_kind, layer, t)
            other: dict[str, Any] = {"source": src, "target": dst, "weight": value, "kind": kind}
            if kind == "ffn" and ffn_effects is not None and direct is not None:
                other["direct_effect"] = ffn_effects[layer] if t == direct.position else 0.0
            edges.append(other)
    return edges


def _edge_heads(route: Route, idx: torch.Tensor, run: ModelRun) -> list[list[float]]:
    """Per-head contribution of each attention edge in ``idx`` (rows of layer, t, s)."""
    out = torch.zeros(len(idx), run.layers[0].values.shape[1])
    for layer in idx[:, 0].unique().tolist():
        sel = (idx[:, 0] == layer).nonzero().flatten()
        rows, inverse = idx[sel, 1].unique(return_inverse=True)
        heads, _ = layer_head_contributions(run.layers[layer], rows.to(run.logits.device))
        out[sel] = heads[inverse.to(heads.device), idx[sel, 2].to(heads.device)].cpu()
    rounded: list[list[float]] = out.tolist()
    return rounded


def graph_json(
    graph: FlowGraph,
    route: Route,
    prediction: Prediction,
    *,
    position: int,
    run: ModelRun | None = None,
    contrast: Contrast | None = None,
    direct: DirectEffects | None = None,
) -> dict[str, Any]:
    """The CLI's JSON object; pass ``run`` to include per-head weights on attention edges, and
    ``contrast`` with ``direct`` for the target/distractor fields."""
    data: dict[str, Any] = {
        "model": graph.model_name,
        "tokens": list(graph.tokens),
        "token_ids": list(graph.token_ids),
        "n_layers": graph.n_layers,
        "threshold": route.threshold,
        "renormalize": route.renormalize,
        "position": position,
        "prediction": {"token": prediction.token, "id": prediction.id, "prob": prediction.prob},
        "nodes": route_nodes(route),
        "edges": route_edges(route, run, direct),
    }
    if contrast is not None:
        data["contrast"] = contrast.to_dict()
    return data


def to_networkx(data: dict[str, Any]) -> nx.MultiDiGraph:
    """A networkx graph of a :func:`graph_json` object (graph attributes keep the metadata).

    A multigraph keyed by edge kind: the s = t attention edge and the residual edge join the
    same two nodes and must stay separate.
    """
    g = nx.MultiDiGraph(
        model=data["model"],
        threshold=data["threshold"],
        renormalize=data["renormalize"],
        position=data["position"],
    )
    for key, value in data.get("contrast", {}).items():
        g.graph[f"contrast_{key}"] = value
    tokens = data["tokens"]
    for node in data["nodes"]:
        g.add_node(
            node["id"],
            layer=node["layer"],
            token=node["token"],
            kind=node["kind"],
            text=tokens[node["token"]],
        )
    for edge in data["edges"]:
        attrs = {"weight": edge["weight"], "kind": edge["kind"]}
        for h, value in edge.get("heads", {}).items():
            attrs[f"head_{h}"] = value
        if "direct_effect" in edge:
            attrs["direct_effect"] = edge["direct_effect"]
        for h, value in edge.get("head_direct_effects", {}).items():
            attrs[f"head_{h}_direct_effect"] = value
        g.add_edge(edge["source"], edge["target"], key=edge["kind"], **attrs)
    return g


def to_graphml(data: dict[str, Any]) -> str:
    buffer = io.BytesIO()
    nx.write_graphml(to_networkx(data), buffer)
    return buffer.getvalue().decode("utf-8")
