"""Tests for app/prompts.py (which prompt files the explorer offers) and of the reader it relies
on, :func:`llm_flow.io.prompts.read_prompt_file` (LLM-TT's JSON lines and plain text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.prompts import offered_files, prompt_files
from llm_flow.config import load_config
from llm_flow.errors import PromptError
from llm_flow.io.prompts import read_prompt_file as read_prompts

REPO = Path(__file__).resolve().parents[2]


def test_reads_llm_tt_jsonl_and_text(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"sentence": "one"}\n\n{"sentence": "two\\nlines"}\n{"sentence": "one"}\n')
    assert read_prompts(jsonl) == ["one", "two\nlines"]
    text = tmp_path / "b.txt"
    text.write_text("first\n\n  \nsecond\n")
    assert read_prompts(text) == ["first", "second"]


def test_the_repositorys_sample_inputs_load() -> None:
    prompts = read_prompts(REPO / "sample_inputs" / "sample_input.jsonl")
    assert "The capital of France is" in prompts
    assert "sample_input.jsonl" in prompt_files(REPO / "sample_inputs")


@pytest.mark.parametrize(
    ("line", "message"),
    [("not json", "invalid JSON"), ('{"text": "x"}', '"sentence"'), ("[1]", '"sentence"')],
)
def test_bad_jsonl_says_which_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "ok"}\n' + line + "\n")
    with pytest.raises(PromptError, match=f"bad.jsonl, line 2: .*{message}"):
        read_prompts(path)


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
