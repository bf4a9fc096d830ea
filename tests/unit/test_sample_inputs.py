"""The shipped prompt files keep the formats the app, the CLI and the tests rely on."""

from __future__ import annotations

import gzip
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


CORPUS_BOOKS = {
    "austen-pride-and-prejudice.txt.gz": "https://www.gutenberg.org/ebooks/1342",
    "doyle-adventures-of-sherlock-holmes.txt.gz": "https://www.gutenberg.org/ebooks/1661",
    "carroll-alice-in-wonderland.txt.gz": "https://www.gutenberg.org/ebooks/11",
}


def test_the_shipped_corpus_is_three_public_domain_books_with_their_sources() -> None:
    folder = SAMPLES / "corpus"
    readme = (folder / "README.md").read_text(encoding="utf-8")

    assert {p.name for p in folder.glob("*.txt.gz")} == set(CORPUS_BOOKS)
    for name, url in CORPUS_BOOKS.items():
        assert f"`{name}`" in readme and url in readme
    assert readme.count("public domain in the United States") >= len(CORPUS_BOOKS)
    words = sum(
        len(gzip.decompress((folder / name).read_bytes()).decode("utf-8").split())
        for name in CORPUS_BOOKS
    )
    # 281k words; the packaged SmolLM2 tokenizer makes 366,222 tokens of them (README.md there,
    # checked in tests/integration/test_corpus_packaged.py).
    assert words >= 250_000
    assert "START OF THE PROJECT GUTENBERG" not in gzip.decompress(
        (folder / "austen-pride-and-prejudice.txt.gz").read_bytes()
    ).decode("utf-8")
