"""Tests for llm_flow/io/corpus.py: the readers (text, gzip, JSONL, folders, datasets offline)
and the token windows, on the tiny word-level tokenizer (one token per word, BOS prepended)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from llm_flow.errors import CorpusError
from llm_flow.io import corpus as corpus_module
from llm_flow.io.corpus import default_corpus, open_corpus, special_prefix, token_windows
from llm_flow.models.bridge import BridgeLlm
from llm_flow.resources import default_corpus_dir
from tests.tiny import prompt, tiny_llm

LINES = [prompt(9, seed=i) for i in range(10)]  # 90 words


@pytest.fixture(scope="module")
def llm() -> BridgeLlm:
    return tiny_llm("llama-gqa")


def all_tokens(llm: BridgeLlm, path: Path, window: int = 8) -> list[int]:
    """The corpus's tokens as the windows hold them, the BOS of each window dropped."""
    return [t for w in token_windows(llm, open_corpus(path), window) for t in w.token_ids[1:]]


def test_windows_are_fixed_length_start_with_bos_and_cover_the_text(
    llm: BridgeLlm, tmp_path: Path
) -> None:
    path = tmp_path / "c.txt"
    path.write_text("\n".join(LINES), "utf-8")
    windows = list(token_windows(llm, open_corpus(path), 8))

    assert special_prefix(llm) == [0]
    assert [w.number for w in windows] == list(range(len(windows)))
    assert all(w.token_ids[0] == 0 for w in windows)
    assert {len(w.token_ids) for w in windows[:-1]} == {8}
    assert 1 < len(windows[-1].token_ids) <= 8
    assert all_tokens(llm, path) == llm.encode(" ".join(LINES))
    part = list(token_windows(llm, open_corpus(path), 8, start=3, stop=7))
    assert part == windows[3:7]


def test_gzip_jsonl_and_folders_read_the_same_text(llm: BridgeLlm, tmp_path: Path) -> None:
    plain = tmp_path / "c.txt"
    plain.write_text("\n".join(LINES), "utf-8")
    packed = tmp_path / "c.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES), "utf-8")
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(LINES[:5]) + "\n", "utf-8")
    (folder / "b.txt.gz").write_bytes(gzip.compress("\n".join(LINES[5:]).encode()))
    (folder / "README.md").write_text("not corpus text", "utf-8")

    want = all_tokens(llm, plain)
    assert all_tokens(llm, packed) == want
    assert all_tokens(llm, jsonl) == want
    assert all_tokens(llm, folder) == want
    assert open_corpus(plain).content_hash() != open_corpus(packed).content_hash()
    assert [p.name for p in open_corpus(folder).files] == ["a.txt", "b.txt.gz"]


def test_long_text_is_read_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 100)
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(LINES), "utf-8")
    pieces = list(open_corpus(path).texts())

    assert len(pieces) > 3 and max(map(len, pieces)) < 4 * 100 + 100
    assert "".join(pieces) == path.read_text("utf-8")


def test_unreadable_corpora_are_errors_in_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llm: BridgeLlm
) -> None:
    with pytest.raises(CorpusError, match="'missing.txt' not found"):
        open_corpus(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"title": "no text"}\n', "utf-8")
    with pytest.raises(CorpusError, match=r'bad.jsonl, line 2: expected an object with a "text"'):
        list(open_corpus(bad).texts())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no corpus files"):
        open_corpus(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="cannot be read offline"):
        open_corpus("someone/some-dataset")
    with pytest.raises(CorpusError, match="at least 2"):
        list(token_windows(llm, open_corpus(bad), 1))


def test_the_shipped_corpus_is_the_default() -> None:
    corpus = default_corpus()

    assert corpus.files and all(p.parent == default_corpus_dir() for p in corpus.files)
    assert open_corpus(None) == corpus
