"""The README's "Supported models" table is the test matrix, never a stale copy of it."""

from __future__ import annotations

from tests.families import FAMILIES
from tests.supported_models import README, main, rendered, section


def test_the_readme_table_is_the_one_the_matrix_writes() -> None:
    text = README.read_text(encoding="utf-8")
    assert section(text) == rendered(), "stale: run python -m tests.supported_models"
    assert main(["--check"]) == 0


def test_every_family_has_a_row_and_the_check_would_see_a_change() -> None:
    table = rendered()
    for name in FAMILIES:
        assert f"| {name} |" in table
    assert table.count("| ✔ |") == len(FAMILIES)
    assert rendered().replace("Mixtral", "Mistral-MoE") != section(README.read_text("utf-8"))
