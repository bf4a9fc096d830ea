"""Tests for app/prompts.py: which prompt files the explorer offers (reading them is tested in
tests/unit/io/test_prompts.py)."""

from __future__ import annotations

from pathlib import Path

from app.prompts import offered_files, prompt_files
from llm_flow.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_the_repositorys_sample_inputs_are_offered() -> None:
    assert "sample_input.jsonl" in prompt_files(REPO / "sample_inputs")


def test_prompt_files_lists_only_prompt_files(tmp_path: Path) -> None:
    for name in ("a.txt", "b.jsonl", "c.json", "d.py"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub.txt").mkdir()
    assert prompt_files(tmp_path) == ["a.txt", "b.jsonl"]
    assert prompt_files(None) == []
    assert prompt_files(tmp_path / "missing") == []


def test_only_servers_that_allow_files_offer_them(
    config_path: Path, demo_config_path: Path
) -> None:
    assert offered_files(load_config(config_path)) == ["more.txt", "preloaded.jsonl"]
    assert offered_files(load_config(demo_config_path)) == []
