"""Writes the README's "Supported models" table from the test matrix (``tests/families.py``).

Run ``python -m tests.supported_models`` after changing the matrix; ``--check`` exits 1 when
the README is stale (``tests/unit/test_supported_models.py`` fails then too).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tests.families import FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- supported-models: written by python -m tests.supported_models -->"
END = "<!-- supported-models: end -->"


def hf_class(model_type: str) -> str:
    name: str = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return name


def table() -> str:
    """The Markdown table, one row per family of the matrix."""
    rows = [
        "| family | Hugging Face class | what is special | FFN | tested |",
        "| --- | --- | --- | --- | --- |",
    ]
    for family in FAMILIES.values():
        ffn = "experts" if family.experts else "dense"
        cls = hf_class(family.config().model_type)
        rows.append(f"| {family.name} | `{cls}` | {family.special} | {ffn} | ✔ |")
    return "\n".join(rows)


def section(text: str) -> str:
    """The generated block of ``text`` (the README), markers included."""
    start, end = text.index(START), text.index(END) + len(END)
    return text[start:end]


def rendered() -> str:
    return f"{START}\n{table()}\n{END}"


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    if "--check" in argv:
        return 0 if section(text) == rendered() else 1
    README.write_text(text.replace(section(text), rendered()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
