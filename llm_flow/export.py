"""Export a route (or the full graph) as the CLI's JSON contract, a networkx graph, or GraphML.

The JSON object (ARCHITECTURE.md, "CLI contract")::

    {"model", "tokens", "token_ids", "n_layers", "threshold", "renormalize", "position",
     "prediction": {"token", "id", "prob"},
     "nodes": [{"id", "layer", "token", "kind"}],
     "edges": [{"source", "target", "weight", "kind", "heads"?: {"<h>": float}}]}

Masks cross to Python once per array (``nonzero().tolist()``); building the output dicts is the
only per-edge Python.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch

from llm_flow.graph import NODE_KINDS, FlowGraph, layer_head_contributions, node_id, source_id
from llm_flow.models.base import ModelRun, TransparentLlm
from llm_flow.routes import Route


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


def route_edges(route: Route, run: ModelRun | None = None) -> list[dict[str, Any]]:
    """Every edge on the route with its (thresholded, maybe renormalized) weight.

    With ``run`` (holding attention patterns), attention edges get per-head contributions.
    """
    w = route.weights
    idx = route.attention.nonzero()  # [E, 3] (layer, target t, source s)
    weights = w.attention[idx[:, 0], idx[:, 1], idx[:, 2]].tolist()
    heads = _edge_heads(route, idx, run) if run is not None else None
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
        edges.append(edge)
    # (mask, weight, source kind, target kind, edge kind); "I-" is the residual below layer l
    for mask, weight, src_kind, dst_kind, kind in (
        (route.attn_residual, w.attn_residual, "I-", "A", "residual"),
        (route.ffn_residual, w.ffn_residual, "A", "I", "residual"),
        (route.ffn, w.ffn, "A", "M", "ffn"),
        (route.ffn, w.ffn, "M", "I", "ffn"),
    ):
        pos = mask.nonzero()
        values = weight[pos[:, 0], pos[:, 1]].tolist()
        for (layer, t), value in zip(pos.tolist(), values, strict=True):
            src = source_id(layer, t) if src_kind == "I-" else node_id(src_kind, layer, t)
            dst = node_id(dst_kind, layer, t)
            edges.append({"source": src, "target": dst, "weight": value, "kind": kind})
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
) -> dict[str, Any]:
    """The CLI's JSON object; pass ``run`` to include per-head weights on attention edges."""
    return {
        "model": graph.model_name,
        "tokens": list(graph.tokens),
        "token_ids": list(graph.token_ids),
        "n_layers": graph.n_layers,
        "threshold": route.threshold,
        "renormalize": route.renormalize,
        "position": position,
        "prediction": {"token": prediction.token, "id": prediction.id, "prob": prediction.prob},
        "nodes": route_nodes(route),
        "edges": route_edges(route, run),
    }


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
        g.add_edge(edge["source"], edge["target"], key=edge["kind"], **attrs)
    return g


def to_graphml(data: dict[str, Any]) -> str:
    buffer = io.BytesIO()
    nx.write_graphml(to_networkx(data), buffer)
    return buffer.getvalue().decode("utf-8")
