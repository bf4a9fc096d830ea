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
