"""Tests for llm_flow/io/image.py: titled exports and PNG/SVG through kaleido + system Chromium."""

from __future__ import annotations

import importlib.util
import os

import plotly.graph_objects as go
import pytest

from llm_flow.errors import ExportError
from llm_flow.io import image
from llm_flow.io.image import browser_path, export_title, titled, to_image

TOKENS = ("The", " capital", " of", " <France>", " is")


def test_the_title_names_model_prompt_threshold_and_position() -> None:
    title = export_title("SmolLM2", TOKENS, threshold=0.04, renormalize=True, position=4)
    assert title.startswith("SmolLM2 · “The capital of &lt;France&gt; is”")  # plotly markup
    assert "τ = 0.040 (renormalized)" in title
    assert title.endswith("route to token 4 of 0–4:  is")


def test_a_long_prompt_is_cut_in_the_title() -> None:
    title = export_title("m", ("w",) * 500, threshold=0.0, renormalize=False, position=0)
    assert "…" in title and len(title) < 200 and "renormalized" not in title


def test_titled_copies_the_figure() -> None:
    figure = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]))
    out = titled(figure, "a title")
    assert out.layout.title.text == "a title" and figure.layout.title.text is None


def test_unknown_formats_and_a_missing_kaleido_are_explained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    figure = go.Figure()
    with pytest.raises(ExportError, match="choose one of"):
        to_image(figure, "jpeg")
    monkeypatch.setattr(image.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExportError, match="needs kaleido"):
        to_image(figure, "png")


def test_the_system_browser_is_used_never_a_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSER_PATH", "/opt/my-chrome")
    assert browser_path() == "/opt/my-chrome"
    monkeypatch.delenv("BROWSER_PATH")
    monkeypatch.setattr(image.shutil, "which", lambda path: None)
    assert browser_path() is None
    if importlib.util.find_spec("kaleido") is not None:
        with pytest.raises(ExportError, match="never downloads a browser"):
            to_image(go.Figure(), "png")


def test_png_and_svg_carry_the_title() -> None:
    """Runs wherever kaleido and a Chromium are installed; in CI (CI=true) they must be."""
    missing = importlib.util.find_spec("kaleido") is None or browser_path() is None
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install kaleido (the dev extra) and the system chromium")
        pytest.skip("kaleido or Chromium is not installed")
    figure = titled(go.Figure(go.Scatter(x=[0, 1], y=[1, 0])), "route of tiny at τ = 0.040")
    png = to_image(figure, "png", scale=1)
    assert png.startswith(b"\x89PNG")
    svg = to_image(figure, "svg")
    assert svg.lstrip().startswith(b"<svg") and "τ = 0.040".encode() in svg
