"""Whether a result on show still matches the settings on the page (issue 12.4).

A result panel keeps the key it was computed with; the view builds the key the current
settings would give and shows, above the result, what changed ("τ 0.040 → 0.045", "mode mean →
zero") with a button that runs it again. Pure: the keys are frozen dataclasses.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from llm_flow.analyses.interventions import Ablation


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, Ablation):
        parts = [
            f"{name} {', '.join(items)}"
            for name, items in value.to_dict().items()
            if name != "mode" and items
        ]
        return f"{value.mode}: {'; '.join(parts) or 'nothing'}"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return " vs ".join(repr(v) for v in value)
    path = getattr(value, "path", None)
    if isinstance(path, str):  # a MeansKey: the prompt file is what a person chose
        return PurePath(path).name
    return str(value)


def changes(shown: Any, current: Any | None, labels: dict[str, str]) -> list[str]:
    """What differs between the key of the result on show and the key of the current settings,
    one "label before → now" per field in ``labels``; ``current`` None (the settings are not
    valid now) differs in every labelled field that is set."""
    out = []
    for field, label in labels.items():
        was = getattr(shown, field)
        now = None if current is None else getattr(current, field)
        if was != now:
            out.append(f"{label} {_text(was)} → {_text(now)}")
    return out
