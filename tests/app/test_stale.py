"""Tests for app/stale.py: what changed between a shown result's key and the page's."""

from __future__ import annotations

from dataclasses import dataclass

from app.stale import changes


@dataclass(frozen=True)
class Key:
    threshold: float
    mode: str
    pair: tuple[str, str] | None


LABELS = {"threshold": "τ", "mode": "mode", "pair": "contrast"}


def test_changes_name_each_field_before_and_now() -> None:
    shown = Key(0.04, "mean", ("a", "b"))
    assert changes(shown, shown, LABELS) == []
    now = Key(0.045, "zero", None)
    assert changes(shown, now, LABELS) == [
        "τ 0.040 → 0.045",
        "mode mean → zero",
        "contrast 'a' vs 'b' → none",
    ]


def test_settings_that_are_not_valid_now_differ_everywhere() -> None:
    assert changes(Key(0.04, "zero", None), None, LABELS) == ["τ 0.040 → none", "mode zero → none"]
