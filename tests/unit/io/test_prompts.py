"""Tests for llm_flow/io/prompts.py: LLM-TT's JSON lines and plain-text prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_flow.errors import PromptError
from llm_flow.io.prompts import read_prompt_file

REPO = Path(__file__).resolve().parents[3]


def test_reads_llm_tt_jsonl_and_text(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"sentence": "one"}\n\n{"sentence": "two\\nlines"}\n{"sentence": "one"}\n')
    assert read_prompt_file(jsonl) == ["one", "two\nlines"]
    text = tmp_path / "b.txt"
    text.write_text("first\n\n  \nsecond\n")
    assert read_prompt_file(text) == ["first", "second"]


def test_the_repositorys_sample_inputs_load() -> None:
    prompts = read_prompt_file(REPO / "sample_inputs" / "sample_input.jsonl")
    assert "The capital of France is" in prompts


@pytest.mark.parametrize(
    ("line", "message"),
    [("not json", "invalid JSON"), ('{"text": "x"}', '"sentence"'), ("[1]", '"sentence"')],
)
def test_bad_jsonl_says_which_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "ok"}\n' + line + "\n")
    with pytest.raises(PromptError, match=f"bad.jsonl, line 2: .*{message}"):
        read_prompt_file(path)


def test_read_prompt_file_formats(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("one\n\ntwo\none\n  \n")
    assert read_prompt_file(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"sentence": "a"}\n\n{"sentence": "b"}\n')
    assert read_prompt_file(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(PromptError, match="line 1"):
        read_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(PromptError, match="cannot read"):
        read_prompt_file(tmp_path / "missing.txt")
