"""Helpers of the tests that run the whole app with Streamlit's AppTest (no browser).

Clicks on the plotly graph cannot be simulated by AppTest; they end up as a selection string in
session state (``app.session.SELECTION``), which the tests set directly. The click itself is
covered by tests/app/test_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from streamlit.testing.v1 import AppTest

from tests.app.conftest import Downloads

APP = Path(__file__).resolve().parents[2] / "app" / "main.py"
TIMEOUT = 60


def start(query: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if query:
        at.query_params.update(query)
    return at.run()


def assert_serving(at: AppTest) -> None:
    """No exception, no error, and a graph on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert route_caption(at)


def route_caption(at: AppTest) -> str | None:
    return next((c.value for c in at.caption if c.value.startswith("Route:")), None)


def errors(at: AppTest) -> str:
    """The error texts as a user reads them (Markdown escapes removed)."""
    return re.sub(r"\\(.)", r"\1", " | ".join(e.value for e in at.error))


def graph_data(at: AppTest) -> dict[str, Any]:
    """What the route graph component (app/views/route_graph.py) was sent."""
    (graph,) = at.get("bidi_component")
    data: dict[str, Any] = json.loads(graph.proto.json)
    return data


def graph_spec(at: AppTest) -> dict[str, Any]:
    """The plotly spec of the route graph: the server's figure the component draws."""
    spec: dict[str, Any] = json.loads(graph_data(at)["figure"])
    return spec


def graph_ids(at: AppTest) -> list[str]:
    """Everything the graph lets a user click (the figure's customdata strings)."""
    ids: list[str] = []
    for trace in graph_spec(at)["data"]:
        data = trace.get("customdata") or []
        ids += [d for d in data if isinstance(d, str)]
    return ids


def subheaders(at: AppTest) -> list[str]:
    return [s.value for s in at.subheader]


def download_keys(at: AppTest) -> set[str]:
    """The user keys of the page's download buttons (Streamlit ids end in ``-{key}``)."""
    return {b.proto.id.rsplit("-", 1)[-1] for b in at.get("download_button")}


def downloaded(at: AppTest, files: Downloads, key: str) -> tuple[bytes, str | None, str | None]:
    """(bytes, mime type, file name) of the download button ``key``, as a click gets them."""
    (button,) = [b for b in at.get("download_button") if b.proto.id.endswith(f"-{key}")]
    file_id = button.proto.deferred_file_id or PurePosixPath(button.proto.url).stem
    content, mime, name = files[file_id]
    return content(), mime, name


# The tiny models' vocabulary is w0 … w60 (one token each): w3 vs w4 is a valid contrast.
CONTRAST = {"target": "w3", "distractor": "w4"}


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}
