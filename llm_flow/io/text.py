"""Tokens and messages as a person reads them, escaped for where they are shown.

One module for every front end's escaping: the figures (plotly reads ``<...>`` as markup) and
the app (Streamlit reads Markdown and LaTeX in ``st.markdown``/``st.error``).
"""

from __future__ import annotations

import html
import re

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|$<>~])")


def display_token(token: str) -> str:
    """A token as a person can read it: whitespace made visible, never an empty label."""
    if token == "":
        return "∅"
    text = token.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return text if text.strip() else "␣" * len(text)


def plotly_text(token: str) -> str:
    """``display_token`` escaped for plotly, which reads ``<...>`` as markup (``<bos>`` would
    vanish)."""
    return html.escape(display_token(token), quote=False)


def markdown_text(text: str) -> str:
    """Text for ``st.markdown``/``st.error`` shown literally: a token like ``$`` or ``**`` (or
    a path with two ``_``) would otherwise turn into LaTeX or emphasis."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def position_text(t: int, n_tokens: int | None = None) -> str:
    """The one way every front end names a token position: counted from 0, as node ids
    (``I3_5``), the CLI's ``--position`` and the JSON do. With ``n_tokens`` the range is said,
    so the last of 14 tokens reads "token 13 of 0–13", never "token 13 of 14"."""
    return f"token {t}" if n_tokens is None else f"token {t} of 0–{n_tokens - 1}"


def weight_text(weight: float, renormalized: bool) -> str:
    """An edge weight as the graph draws it (3 decimals, the hover's rounding), saying whether
    it was rescaled by renormalizing the route."""
    return f"{weight:.3f}" + (" (renormalized)" if renormalized else "")
