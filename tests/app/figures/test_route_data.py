"""Tests for app/figures/route_data.py and the route search of app/views/route_graph.js.

The browser's route must be the server's: ``findRoute`` (run here in Node, the same file the
component loads) is compared with :func:`llm_flow.engine.routes.find_route` on random graphs at
every slider step above the data's floor, with and without renormalizing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.figures import route_data as rd
from llm_flow.engine.routes import find_route
from llm_flow.engine.trace import Prediction
from tests.graphs import random_graph

JS = Path(__file__).resolve().parents[3] / "app" / "views" / "route_graph.js"
STEPS = [round(i * 0.005, 3) for i in range(41)]
NODE = shutil.which("node")


def _trace(seed: int, n_layers: int = 5, n_tokens: int = 9, floor: float = 0.0) -> Any:
    graph = random_graph(n_layers, n_tokens, seed, floor=floor)
    tokens = [f"w{t}" for t in range(n_tokens)]
    predictions = tuple(Prediction(f"<p{t}>", t, 0.5) for t in range(n_tokens))
    return SimpleNamespace(graph=graph, tokens=tokens, predictions=predictions)


def test_the_data_holds_every_edge_a_route_above_the_floor_can_keep() -> None:
    trace = _trace(0)
    data = rd.route_data(trace, position=-1, renormalize=True, floor=0.02)
    a = {k: rd.unpacked(v, "f4" if k == "weight" else "i4") for k, v in data["attention"].items()}
    sent = set(zip(a["layer"], a["target"], a["source"], strict=True))
    assert data["position"] == 8 and data["tokens"][0] == "w0"
    assert data["predictions"][0] == "&lt;p0&gt;"  # escaped for plotly's markup
    for tau in [s for s in STEPS if s >= 0.02]:
        route = find_route(trace.graph, [8], tau, renormalize=True)
        assert {tuple(e) for e in route.attention_idx.tolist()} <= sent
    # Below the floor, edges are missing: the data is not the whole graph.
    low = find_route(trace.graph, [8], 0.0, renormalize=False)
    assert len(low.attention_idx) > len(sent)


def test_the_floor_is_the_lowest_step_within_the_edge_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graph = _trace(1).graph
    counts = [len(find_route(graph, [8], s, renormalize=False).attention_idx) for s in STEPS]
    budget = counts[4]  # τ = 0.02
    assert counts[3] > budget  # the test needs a budget that bites
    monkeypatch.setattr(rd, "MAX_CLIENT_EDGES", budget)
    step = rd.floor_route(graph, 8, STEPS).threshold
    assert rd.data_floor(step, 0.2) == 0.02
    assert rd.data_floor(step, 0.01) == 0.01  # what the server draws now
    monkeypatch.setattr(rd, "MAX_CLIENT_EDGES", 10**9)
    assert rd.data_floor(rd.floor_route(graph, 8, STEPS).threshold, 0.2) == 0.0


def _js_routes(data: dict[str, Any], taus: list[float], tmp_path: Path) -> list[dict[str, Any]]:
    """``findRoute`` of route_graph.js at each τ, run by Node."""
    module = tmp_path / "route_graph.mjs"
    module.write_text(JS.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "data.json").write_text(json.dumps(data), encoding="utf-8")
    script = tmp_path / "run.mjs"
    script.write_text(
        f"""
import {{ readFileSync }} from "node:fs";
import {{ findRoute, prepare }} from "{module.as_posix()}";
const d = prepare(JSON.parse(readFileSync("{(tmp_path / "data.json").as_posix()}", "utf8")));
const out = {json.dumps(taus)}.map((tau) => {{
  const r = findRoute(d, tau);
  const list = (m) => Array.from(m);
  return {{ attention: r.attention, attnResidual: list(r.attnResidual), ffn: list(r.ffn),
           ffnResidual: list(r.ffnResidual), afterAttention: list(r.afterAttention),
           afterLayer: list(r.afterLayer), embeddings: list(r.embeddings) }};
}});
process.stdout.write(JSON.stringify(out));
""",
        encoding="utf-8",
    )
    done = subprocess.run(
        [str(NODE), str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    routes: list[dict[str, Any]] = json.loads(done.stdout)
    return routes


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize(
    ("seed", "renormalize", "graph_floor"),
    [(0, True, 0.0), (1, False, 0.0), (2, True, 0.01), (3, True, 0.0)],
)
def test_the_browser_route_equals_find_route(
    seed: int, renormalize: bool, graph_floor: float, tmp_path: Path
) -> None:
    trace = _trace(seed, n_layers=6, n_tokens=11, floor=graph_floor)
    floor = 0.01
    data = rd.route_data(trace, position=7, renormalize=renormalize, floor=floor)
    # The slider's steps, and τ exactly at some weights (kept: "≥ τ", in float32 as torch).
    weights = rd.unpacked(data["attention"]["weight"], "f4")
    ties = [w for w in weights[::7] if 0.01 <= w <= 0.2][:4]
    ties += [w for w in rd.unpacked(data["attn_residual"], "f4")[::5] if 0.01 <= w <= 0.2][:2]
    assert len(ties) >= 4
    taus = [s for s in STEPS if s >= floor] + ties
    for tau, js in zip(taus, _js_routes(data, taus, tmp_path), strict=True):
        route = find_route(trace.graph, [7], tau, renormalize=renormalize)
        idx, weights = route.attention_edges()
        got = [tuple(e[:3]) for e in js["attention"]]
        assert got == [tuple(e) for e in idx.tolist()], tau  # same edges, same order
        assert [e[3] for e in js["attention"]] == pytest.approx(weights.tolist(), rel=1e-5)
        for name, mask in (
            ("attnResidual", route.attn_residual),
            ("ffn", route.ffn),
            ("ffnResidual", route.ffn_residual),
            ("afterAttention", route.after_attention),
            ("afterLayer", route.after_layer),
        ):
            assert js[name] == mask.flatten().int().tolist(), (tau, name)
        assert js["embeddings"] == route.embeddings.int().tolist(), tau
    assert len({len(r["attention"]) for r in _js_routes(data, taus, tmp_path)}) > 3  # τ matters


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_browser_compares_in_float32(tmp_path: Path) -> None:
    """A weight of float32(0.04) < 0.04 survives τ = 0.04 on the server; so in the browser."""
    trace = _trace(5)
    trace.graph.ffn_residual.fill_(0.04)  # float32(0.04) = 0.0399999991
    data = rd.route_data(trace, position=-1, renormalize=True, floor=0.0)
    (js,) = _js_routes(data, [0.04], tmp_path)
    route = find_route(trace.graph, [-1], 0.04)
    assert bool(route.ffn_residual.any())
    assert js["ffnResidual"] == route.ffn_residual.flatten().int().tolist()


def test_arrays_are_packed_exactly() -> None:
    """float32 weights and int32 indices survive the base64 round trip bit for bit."""
    trace = _trace(4)
    data = rd.route_data(trace, position=-1, renormalize=False, floor=0.0)
    route = find_route(trace.graph, [-1], 0.0, renormalize=False)
    idx, weights = route.attention_edges()
    assert rd.unpacked(data["attention"]["weight"], "f4") == weights.tolist()
    assert rd.unpacked(data["attention"]["source"], "i4") == idx[:, 2].tolist()
    assert rd.unpacked(data["ffn"], "f4") == trace.graph.ffn.flatten().tolist()


def test_the_floor_route_is_reused_as_the_data_superset(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = _trace(6)
    monkeypatch.setattr(rd, "MAX_CLIENT_EDGES", 40)
    superset = rd.floor_route(trace.graph, 8, STEPS)
    assert superset.threshold > 0 and len(superset.attention_idx) <= 40
    reused = rd.route_data(trace, 8, True, superset.threshold, superset)
    assert reused == rd.route_data(trace, 8, True, superset.threshold)
    # A superset of another floor is not taken as is.
    assert rd.route_data(trace, 8, True, 0.0, superset) == rd.route_data(trace, 8, True, 0.0)
