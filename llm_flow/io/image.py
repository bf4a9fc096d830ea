"""Figures as files that say what they show: a title with the model, prompt, τ and position on
the HTML and on static PNG/SVG images.

Static images are drawn by kaleido 1.x, which drives a Chrome/Chromium. llm-flow never lets it
download one: it is pointed at the system's browser (``/usr/bin/chromium``, or ``BROWSER_PATH``
when set), and without kaleido or a browser the export raises :class:`ExportError` saying how to
get them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Sequence

import plotly.graph_objects as go

from llm_flow.errors import ExportError
from llm_flow.io.text import plotly_text, position_text

IMAGE_FORMATS = ("png", "svg")
SYSTEM_BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
_PROMPT_CHARS = 90  # a longer prompt is cut in the title (the JSON holds every token)


def export_title(
    model: str,
    tokens: Sequence[str],
    *,
    threshold: float,
    renormalize: bool,
    position: int,
) -> str:
    """One title line for every exported figure: model, prompt, τ and the explained position."""
    prompt = "".join(tokens)
    if len(prompt) > _PROMPT_CHARS:
        prompt = prompt[: _PROMPT_CHARS - 1] + "…"
    where = position_text(position, len(tokens))
    return (
        f"{plotly_text(model)} · “{plotly_text(prompt)}” · τ = {threshold:.3f}"
        + (" (renormalized)" if renormalize else "")
        + f" · route to {where}: {plotly_text(tokens[position])}"
    )


def titled(figure: go.Figure, title: str) -> go.Figure:
    """A copy of ``figure`` with ``title`` on top (the app's figure has none: the page says it)."""
    copy = go.Figure(figure)
    top = max(int(copy.layout.margin.t or 0), 60)
    copy.update_layout(title={"text": title, "x": 0.01, "font": {"size": 13}}, margin={"t": top})
    return copy


def browser_path() -> str | None:
    """The Chrome/Chromium kaleido should use: ``BROWSER_PATH``, else a system one."""
    chosen = os.environ.get("BROWSER_PATH")
    if chosen:
        return chosen
    return next((p for p in SYSTEM_BROWSERS if shutil.which(p)), None)


def to_image(figure: go.Figure, fmt: str, *, scale: float = 2.0) -> bytes:
    """``figure`` as PNG or SVG bytes, drawn by kaleido with the system's Chromium."""
    if fmt not in IMAGE_FORMATS:
        raise ExportError(f"cannot export a figure as {fmt!r}; choose one of {IMAGE_FORMATS}")
    if importlib.util.find_spec("kaleido") is None:
        raise ExportError(
            "PNG/SVG export needs kaleido: pip install 'kaleido>=1' (it uses the system "
            "Chromium, e.g. apt-get install chromium); the HTML export needs nothing"
        )
    browser = browser_path()
    if browser is None:
        raise ExportError(
            "PNG/SVG export needs a Chrome or Chromium: install the system one (apt-get install "
            "chromium) or set BROWSER_PATH; llm-flow never downloads a browser"
        )
    # choreographer (kaleido's browser driver) reads BROWSER_PATH before searching or downloading.
    os.environ["BROWSER_PATH"] = browser
    error: Exception | None = None
    # Two tries: on a busy machine a cold Chromium can run kaleido's page script before it
    # loaded ("kaleido_scopes is not defined", seen once on the 2-core CI-class machine).
    for _ in range(2):
        try:
            return bytes(figure.to_image(format=fmt, scale=scale))
        except Exception as exc:  # kaleido/choreographer raise their own types; say it in words
            error = exc
    raise ExportError(f"kaleido could not draw the figure as {fmt}: {error}") from error
