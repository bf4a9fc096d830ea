"""Corpora for the corpus index: where text comes from, and how it becomes token windows.

A corpus is a plain text file (``.txt``, or gzip-compressed ``.txt.gz``), a JSON-lines file (a
``"text"`` string per line; LLM-TT prompt files with ``"sentence"`` work too; ``.jsonl.gz``
too), a folder of such files (read in name order; the shipped corpus is one), any other file
read as a prompt file (one prompt per line), or a Hugging Face dataset name (read streaming,
with a lazy ``datasets`` import; the machine must be online).

Text is read in pieces of at most :data:`CHUNK_CHARS` characters cut at line ends, each piece is
tokenized on its own, and the tokens are cut into fixed-length windows: nothing ever holds the
whole corpus. Every window starts with what the model puts in front of a prompt (its BOS token
where it prepends one), so a window is exactly a context the model would consume; only the last
window of a corpus may be shorter. Windows are numbered from 0 in corpus order: an index of
windows ``[a, b)`` and one of ``[b, c)`` merge into the index of ``[a, c)``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from llm_flow.errors import CorpusError
from llm_flow.io.prompts import read_prompt_file
from llm_flow.models.base import TransparentLlm
from llm_flow.resources import default_corpus_dir

CHUNK_CHARS = 16_384  # text tokenized at once: bounds memory, and tokenizer cost per call
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
FILE_SUFFIXES = (*TEXT_SUFFIXES, *JSONL_SUFFIXES)
JSON_FIELDS = ("text", "sentence")
SHIPPED_LABEL = "the shipped corpus"


@dataclass(frozen=True)
class Corpus:
    """Where a corpus's text comes from. ``source`` is a path (a file or a folder) or a Hugging
    Face dataset name; ``label`` names it in messages without a full server path."""

    source: str
    label: str
    files: tuple[Path, ...] = ()  # empty for a dataset
    split: str = "train"

    @property
    def is_dataset(self) -> bool:
        return not self.files

    def content_hash(self) -> str:
        """SHA-256 of every file's bytes and name (read in blocks), or of the dataset's name and
        split: the corpus part of an index's cache key."""
        digest = hashlib.sha256()
        if self.is_dataset:
            digest.update(f"dataset:{self.source}:{self.split}".encode())
            return digest.hexdigest()
        for path in self.files:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def texts(self) -> Iterator[str]:
        """The corpus's text in order, in pieces of at most about :data:`CHUNK_CHARS`."""
        if self.is_dataset:
            yield from _dataset_texts(self.source, self.split)
            return
        for path in self.files:
            yield from _file_texts(path)


def default_corpus() -> Corpus:
    """The shipped corpus: three public-domain Project Gutenberg books
    (``sample_inputs/corpus/``)."""
    return replace(open_corpus(default_corpus_dir()), label=SHIPPED_LABEL)


def open_corpus(source: str | Path | None = None, *, split: str = "train") -> Corpus:
    """A corpus from a path (file or folder) or a Hugging Face dataset name; None: the shipped
    one. A missing path, an empty folder or a dataset name while offline is a
    :class:`CorpusError`."""
    if source is None:
        return default_corpus()
    path = Path(source)
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.name.endswith(FILE_SUFFIXES)))
        if not files:
            raise CorpusError(
                f"folder {path.name!r} holds no corpus files (*.txt, *.txt.gz, *.jsonl)"
            )
        return Corpus(str(path), path.name, files)
    if path.is_file():
        return Corpus(str(path), path.name, (path,))
    if path.suffix or str(source).startswith((".", "/", "~")):
        raise CorpusError(f"corpus file {path.name!r} not found; pass a file, folder or dataset")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise CorpusError(
            f"{source!r} is not a file here, and Hugging Face datasets cannot be read offline "
            "(HF_HUB_OFFLINE is set); pass a text or JSONL file, or omit the corpus to use the "
            "shipped one"
        )
    return Corpus(str(source), str(source), (), split)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return io.TextIOWrapper(path.open("rb"), encoding="utf-8")


def _file_texts(path: Path) -> Iterator[str]:
    try:
        if path.name.endswith(TEXT_SUFFIXES):
            with _open_text(path) as f:
                yield from _pieces(f)
        elif path.name.endswith(JSONL_SUFFIXES):
            with _open_text(path) as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield from _pieces(io.StringIO(_json_text(path, number, line) + "\n\n"))
        else:  # a prompt file: one prompt per line (or LLM-TT's JSON lines)
            yield from _pieces(io.StringIO("".join(p + "\n" for p in read_prompt_file(path))))
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise CorpusError(f"cannot read corpus file {path.name!r}: {exc}") from None


def _json_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path.name}, line {number}: invalid JSON ({exc.msg})") from None
    if isinstance(record, dict):
        for name in JSON_FIELDS:
            if isinstance(record.get(name), str):
                return str(record[name])
    raise CorpusError(
        f'{path.name}, line {number}: expected an object with a "text" string, '
        'like {"text": "It was a dark and stormy night."}'
    )


def _pieces(lines: io.TextIOBase | io.StringIO) -> Iterator[str]:
    """Consecutive lines joined into pieces of about :data:`CHUNK_CHARS` characters, cut after a
    blank line where one comes (so a piece boundary rarely splits a sentence)."""
    piece: list[str] = []
    size = 0
    for line in lines:
        piece.append(line)
        size += len(line)
        if size >= CHUNK_CHARS and (not line.strip() or size >= 4 * CHUNK_CHARS):
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def _dataset_texts(name: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"reading the dataset {name!r} needs the `datasets` package; pass a text file instead"
        ) from None
    try:
        records = datasets.load_dataset(name, split=split, streaming=True)
        for record in records:
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                yield from _pieces(io.StringIO(text + "\n\n"))
    except Exception as exc:  # the hub's many errors (offline, unknown name) read as one
        raise CorpusError(f"cannot read the dataset {name!r}: {exc}") from None


def special_prefix(llm: TransparentLlm) -> list[int]:
    """What the model puts in front of a prompt's text (its BOS token, or nothing): the start
    of every window."""
    probe = " corpus"
    ids, piece = llm.tokenize(probe), llm.encode(probe)
    if piece and ids[-len(piece) :] == piece:
        return ids[: len(ids) - len(piece)]
    return []


class Window(NamedTuple):
    """A window of the corpus: its number in corpus order and the token ids the model reads
    (the special prefix, then the corpus's tokens)."""

    number: int
    token_ids: tuple[int, ...]


def token_windows(
    llm: TransparentLlm,
    corpus: Corpus,
    window: int = 64,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Window]:
    """The corpus's windows ``start ≤ index < stop`` (None: to the end), each ``window`` tokens
    long with the model's prefix (the last one may be shorter). The corpus is read in pieces and
    stops being read after window ``stop − 1``."""
    pieces = (llm.encode(text) for text in corpus.texts())
    return cut_windows(pieces, special_prefix(llm), window, start=start, stop=stop)


def cut_windows(
    pieces: Iterable[Sequence[int]],
    prefix: Sequence[int],
    window: int,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Window]:
    """:func:`token_windows` of a corpus already tokenized piece by piece (``pieces``, read
    lazily) for a model whose prompts start with ``prefix``."""
    body = window - len(prefix)
    if body < 1:
        raise CorpusError(f"a window of {window} tokens leaves no room for text; use at least 2")
    return _cut(pieces, tuple(prefix), body, start, stop)


def _cut(
    pieces: Iterable[Sequence[int]],
    prefix: tuple[int, ...],
    body: int,
    start: int,
    stop: int | None,
) -> Iterator[Window]:
    buffer: list[int] = []
    index = 0
    for piece in pieces:
        buffer.extend(piece)
        while len(buffer) >= body:
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield Window(index, (*prefix, *buffer[:body]))
            del buffer[:body]
            index += 1
    if buffer and index >= start and (stop is None or index < stop):
        yield Window(index, (*prefix, *buffer))
