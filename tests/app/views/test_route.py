"""Tests for app/views/route.py: the prediction above the graph and the downloads beside it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from app import cache, session
from app.cache import ModelKey, TraceKey
from llm_flow.analyses.contrast import contrast, direct_effects
from llm_flow.config import load_config
from llm_flow.engine.routes import find_route
from llm_flow.io.export import graph_json
from tests.app.apptest import (
    CONTRAST,
    assert_serving,
    download_keys,
    downloaded,
    graph_data,
    graph_spec,
    start,
)
from tests.app.conftest import PROMPTS, Downloads

pytestmark = pytest.mark.usefixtures("offline")


def test_the_prediction_of_the_position_is_shown() -> None:
    at = start({"position": "2"})
    assert_serving(at)
    line = next(m.value for m in at.markdown if " predicts " in m.value)
    assert line.startswith("**tiny** predicts") and "(token 2 of 0–6)" in line


def test_downloads_are_offered_and_hold_the_route(downloads: Downloads, config_path: Path) -> None:
    at = start({"threshold": "0.02"})
    assert_serving(at)
    expected = {"download_json", "download_graphml", "download_html"}
    if importlib.util.find_spec("kaleido"):
        expected |= {"download_png", "download_svg"}
    assert download_keys(at) == expected

    data, mime, name = downloaded(at, downloads, "download_json")
    assert (mime, name) == ("application/json", "llm-flow-route.json")
    model_key = ModelKey(load_config(config_path).model("tiny"), "cpu", "float32")
    cached = cache.cached_trace(TraceKey(model_key, PROMPTS[0]))
    assert cached is not None
    position = cached.trace.n_tokens - 1
    route = find_route(cached.trace.graph, [position], 0.02)
    want = graph_json(cached.trace, route, position=position, heads=True)
    assert json.loads(data) == json.loads(json.dumps(want))
    assert all("heads" in e for e in want["edges"] if e["kind"] == "attention")
    graphml, mime, _ = downloaded(at, downloads, "download_graphml")
    assert mime == "application/xml" and graphml.startswith(b"<?xml")


def _output_markers(at: object) -> list[str]:
    spec = graph_spec(at)
    (row,) = [t for t in spec["data"] if t.get("name") == "output position"]
    return list(row["customdata"])


def test_tau_sits_above_the_graph_and_the_graph_can_show_route_tokens_only() -> None:
    at = start({"threshold": "0.1"})
    assert_serving(at)
    # In the route view's fragment, so a step reruns the view only (the sidebar has no slider).
    assert not at.sidebar.slider and at.slider(key=session.THRESHOLD).value == pytest.approx(0.1)
    assert at.toggle(key=session.COMPACT).value is False  # 7 tokens: every column by default
    assert _output_markers(at) == [f"pos:{t}" for t in range(7)]
    at.toggle(key=session.COMPACT).set_value(True).run()
    assert_serving(at)
    shown = _output_markers(at)
    assert "pos:6" in shown and len(shown) < 7


def test_the_apps_json_equals_the_clis_with_the_contrast(
    downloads: Downloads, config_path: Path
) -> None:
    """Issue 12: the app's JSON lacked the contrast block `llm-flow graph --target` writes."""
    at = start({"threshold": "0.02", **CONTRAST})
    assert_serving(at)
    data, _, _ = downloaded(at, downloads, "download_json")
    model_key = ModelKey(load_config(config_path).model("tiny"), "cpu", "float32")
    cached = cache.cached_trace(TraceKey(model_key, PROMPTS[0]))
    assert cached is not None
    tr = cached.trace
    position = tr.n_tokens - 1
    route = find_route(tr.graph, [position], 0.02)
    pair = contrast(tr, CONTRAST["target"], CONTRAST["distractor"], position)
    # what llm_flow/cli/main.py's `graph --heads --target --distractor` builds
    want = graph_json(
        tr, route, position=position, heads=True, contrast=pair, direct=direct_effects(tr, pair)
    )
    got = json.loads(data)
    assert "contrast" in got
    assert got == json.loads(json.dumps(want))


def test_the_html_export_has_a_title_with_model_prompt_threshold_and_position(
    downloads: Downloads,
) -> None:
    at = start({"threshold": "0.02", "position": "2"})
    assert_serving(at)
    html, mime, _ = downloaded(at, downloads, "download_html")
    assert mime == "text/html"
    text = html.decode() if isinstance(html, bytes) else html
    for part in ("tiny · “", "τ = 0.020", "route to token 2 of 0–6"):
        assert json.dumps(part)[1:-1] in text, part  # plotly's JSON escapes non-ASCII


def test_the_graph_component_gets_the_route_data_once_per_trace_and_position() -> None:
    """A τ step sends the same route data (same version: the browser keeps its index) with the
    new τ; the data's floor is never above the τ the server draws."""
    at = start({"threshold": "0.1"})
    assert_serving(at)
    first = graph_data(at)
    assert first["threshold"] == pytest.approx(0.1) and first["route"]["floor"] <= 0.1
    assert first["plotly_url"].endswith("/plotly.min.js")
    at.slider(key=session.THRESHOLD).set_value(0.15).run()
    after = graph_data(at)
    assert after["threshold"] == pytest.approx(0.15) and after["version"] == first["version"]
    at.toggle(key=session.COMPACT).set_value(True).run()
    assert graph_data(at)["compact"] is True
