"""The shipped prompt files keep the formats the app, the CLI and the tests rely on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "sample_inputs"
IOI = re.compile(r"^When (\w+) and (\w+) went to the (\w+), (\w+) gave a (\w+) to$")


def lines(name: str) -> list[str]:
    return (SAMPLES / name).read_text(encoding="utf-8").splitlines()


def test_sample_input_jsonl_is_llm_tt_sentences() -> None:
    sentences = [json.loads(line)["sentence"] for line in lines("sample_input.jsonl")]

    assert len(sentences) >= 10
    assert all(isinstance(s, str) and s.strip() == s and s for s in sentences)
    assert "The capital of France is" in sentences
    assert "When Mary and John went to the store, John gave a drink to" in sentences


def test_ioi_prompts_have_the_ioi_shape() -> None:
    prompts = lines("ioi.txt")

    assert len(prompts) >= 24
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        match = IOI.match(prompt)
        assert match, prompt
        a, b, _, giver, _ = match.groups()
        # The giver repeats B; the answer (the indirect object) is A.
        assert a != b and giver == b, prompt


@pytest.mark.parametrize(
    ("name", "at_least"),
    [("factual.txt", 15), ("code.txt", 10), ("non_english.txt", 10)],
)
def test_plain_prompt_files_have_one_prompt_per_line(name: str, at_least: int) -> None:
    prompts = lines(name)

    assert len(prompts) >= at_least
    assert all(p.strip() == p and p for p in prompts)  # no blank or padded lines
    assert len(set(prompts)) == len(prompts)


def test_bench_text_is_long_enough_for_long_prompts() -> None:
    words = (SAMPLES / "bench_text.txt").read_text(encoding="utf-8").split()
    # 3,795 words are 4,342 SmolLM2 tokens: a 4096-token bench prompt needs no repetition.
    assert len(words) >= 3500
