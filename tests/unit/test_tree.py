"""The tree's own rules (docs/architecture.md, "How the code reads"): no source file over 500
lines, no print() in the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 500
SOURCES = sorted(
    path
    for folder in ("llm_flow", "app", "tests", "scripts")
    if (REPO / folder).is_dir()
    for path in (REPO / folder).rglob("*.py")
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_source_file_is_over_500_lines(path: Path) -> None:
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    assert n_lines <= MAX_LINES, f"{path.relative_to(REPO)} has {n_lines} lines"


def test_the_library_never_prints() -> None:
    printing = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in SOURCES
        if path.is_relative_to(REPO / "llm_flow") and path.name != "main.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
    ]
    assert printing == []
