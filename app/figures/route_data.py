"""What the browser needs to find and draw a route itself, so a τ step redraws without a server
round trip (issue 12): the graph's edges that any τ in a range can keep, and the picture's
constants.

Routes shrink as τ grows: an edge is kept when its *original* weight is ≥ τ and its target is
on the route (renormalizing rescales, never revives), and the route's nodes at a larger τ are a
subset of those at a smaller one. So the route at ``floor`` (unnormalized) holds every attention
edge, with every part of every whole, that a route at any τ ≥ ``floor`` can need; the dense
[L, T] residual and FFN weights are sent whole. ``app/views/route_graph.js`` repeats
:func:`llm_flow.engine.routes.find_route` on these arrays (the server's route stays the one the
panels, downloads and interventions use; tests/app/figures/test_route_data.py compares the two
in Node).

The floor is the lowest slider step whose route has at most :data:`MAX_CLIENT_EDGES` attention
edges (a 400-token prompt at τ = 0 would be millions), or the current τ if that is lower.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llm_flow.engine.graph import FlowGraph
from llm_flow.engine.nodes import NODE_WORDS
from llm_flow.engine.routes import Route, find_route
from llm_flow.engine.trace import Trace
from llm_flow.io import layout, plot
from llm_flow.io.figure import MAX_GRID_NODES, POSITION_PREFIX
from llm_flow.io.text import plotly_text

MAX_CLIENT_EDGES = 40_000  # ~1 MB of JSON; the browser's route search stays a few ms


def floor_route(graph: FlowGraph, position: int, steps: Sequence[float]) -> Route:
    """The unnormalized route to ``position`` at the lowest of the ascending slider ``steps``
    with at most :data:`MAX_CLIENT_EDGES` attention edges (its ``threshold`` is that step; the
    last step when none qualifies). Binary search: edge counts fall as τ grows."""
    routes: dict[int, Route] = {}
    low, high = 0, len(steps) - 1
    while low < high:
        mid = (low + high) // 2
        routes[mid] = find_route(graph, [position], steps[mid], renormalize=False)
        if len(routes[mid].attention_idx) <= MAX_CLIENT_EDGES:
            high = mid
        else:
            low = mid + 1
    if low not in routes:
        routes[low] = find_route(graph, [position], steps[low], renormalize=False)
    return routes[low]


def data_floor(step_floor: float, threshold: float) -> float:
    """The floor of the data for a server drawing at ``threshold``: the :func:`floor_route`
    step ``step_floor``, or ``threshold`` when that is lower (what the server draws now must be
    drawable)."""
    return min(step_floor, threshold)


def packed(values: torch.Tensor) -> str:
    """A flat int32 or float32 array as base64 of its little-endian bytes: a tenth of the JSON
    of a list of floats, and a fixed cost per rerun (Streamlit serializes the data twice)."""
    dtype = torch.float32 if values.is_floating_point() else torch.int32
    array = (
        values.detach()
        .cpu()
        .to(dtype)
        .flatten()
        .contiguous()
        .numpy()
        .astype("<f4" if dtype == torch.float32 else "<i4", copy=False)
    )
    return base64.b64encode(array.tobytes()).decode("ascii")


def unpacked(text: str, kind: str) -> list[float] | list[int]:
    """The inverse of :func:`packed` (``kind`` "f4" or "i4"); for tests and tools."""
    values: list[float] | list[int] = np.frombuffer(base64.b64decode(text), f"<{kind}").tolist()
    return values


def route_data(
    trace: Trace, position: int, renormalize: bool, floor: float, superset: Route | None = None
) -> dict[str, Any]:
    """The edges and node weights of ``trace``'s graph that routes to ``position`` at τ ≥
    ``floor`` can use, the tokens and predictions the picture labels, and its constants
    (``superset``: that route, unnormalized, when the caller has it, e.g. from
    :func:`floor_route`).

    Attention edges are in row-major (layer, target, source) order, as the graph stores them;
    arrays are :func:`packed`; weights are float32 (the browser compares them with
    ``Math.fround(τ)``, as torch compares a float32 tensor with a Python float).
    """
    graph = trace.graph
    if superset is None or superset.threshold != floor or superset.renormalize:
        superset = find_route(graph, [position], floor, renormalize=False)
    idx, weights = superset.attention_edges()  # [E, 3] (layer, t, s), [E]
    return {
        "n_layers": graph.n_layers,
        "n_tokens": graph.n_tokens,
        "position": position % graph.n_tokens,
        "renormalize": renormalize,
        "floor": floor,
        "attention": {
            "layer": packed(idx[:, 0]),
            "target": packed(idx[:, 1]),
            "source": packed(idx[:, 2]),
            "weight": packed(weights),
        },
        # [L * T] row-major, layer by layer.
        "attn_residual": packed(graph.attn_residual),
        "ffn": packed(graph.ffn),
        "ffn_residual": packed(graph.ffn_residual),
        "tokens": [plotly_text(t) for t in trace.tokens],
        "predictions": [plotly_text(p.token) for p in trace.predictions],
        "probs": [round(p.prob, 4) for p in trace.predictions],
        "style": _style(),
    }


def _style() -> dict[str, Any]:
    """The picture's constants, from the Python builders (one source of truth)."""
    return {
        "rows": {k: float(layout.node_y(k, 0)[0]) for k in ("X", "A", "M", "I")},
        "rows_per_layer": layout.ROWS_PER_LAYER,
        "self_bow": layout.SELF_BOW,
        "ffn_offset": layout.FFN_OFFSET,
        "handle_at": layout.HANDLE_AT,
        "max_visible_tokens": layout.MAX_VISIBLE_TOKENS,
        "max_tick_labels": layout.MAX_TICK_LABELS,
        "max_grid_nodes": MAX_GRID_NODES,
        "n_weight_bins": plot.N_WEIGHT_BINS,
        "attention_rgb": list(plot.ATTENTION_RGB),
        "ffn_rgb": list(plot.FFN_RGB),
        "residual_rgb": list(plot.RESIDUAL_RGB),
        "node_colour": plot.NODE_COLOUR,
        "highlight": plot.HIGHLIGHT,
        "invisible": plot.INVISIBLE,
        "node_words": dict(NODE_WORDS),
        "position_prefix": POSITION_PREFIX,
    }
