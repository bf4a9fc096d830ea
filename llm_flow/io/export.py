"""Export a route (or the full graph) as the CLI's JSON contract, a networkx graph, or GraphML.

The JSON object (docs/architecture.md, "Command line")::

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

The node and edge lists come from :mod:`llm_flow.engine.edges`.
"""

from __future__ import annotations

import io
from typing import Any

import networkx as nx

from llm_flow.analyses.contrast import Contrast, DirectEffects
from llm_flow.engine.edges import route_edges, route_nodes
from llm_flow.engine.routes import Route
from llm_flow.engine.trace import Trace


def graph_json(
    trace: Trace,
    route: Route,
    *,
    position: int,
    heads: bool = False,
    contrast: Contrast | None = None,
    direct: DirectEffects | None = None,
) -> dict[str, Any]:
    """The CLI's JSON object of ``route`` (a route of ``trace``'s graph) with the prediction
    after ``position``; ``heads`` adds per-head weights to attention edges (the trace must hold
    attention patterns), ``contrast`` with ``direct`` the target/distractor fields."""
    graph, prediction = trace.graph, trace.prediction(position)
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
        "edges": route_edges(route, trace.run if heads else None, direct),
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
