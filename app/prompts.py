"""Prompt files and prompt checks for the explorer.

Two formats: LLM-TT's JSON lines (``{"sentence": "..."}`` per line, ``*.jsonl``) and plain text
with one prompt per line (anything else). Which files a user may open is decided by
:meth:`llm_flow.config.AppConfig.prompt_file`, never here.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_flow.errors import PromptError

# Listed in the prompt-file picker; other files in prompts_dir are not prompt files.
PROMPT_SUFFIXES = (".jsonl", ".txt")


def read_prompts(path: Path) -> list[str]:
    """The prompts of one file, in file order, without blank lines or duplicates."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read prompt file {path.name!r}: {exc}") from None
    lines = text.splitlines()
    if path.suffix.lower() == ".jsonl":
        prompts = [_sentence(line, number, path.name) for number, line in enumerate(lines, 1)]
    else:
        prompts = lines
    unique = dict.fromkeys(p for p in prompts if p and p.strip())
    return list(unique)


def _sentence(line: str, number: int, name: str) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{name}, line {number}: invalid JSON ({exc.msg})") from None
    sentence = record.get("sentence") if isinstance(record, dict) else None
    if not isinstance(sentence, str):
        raise PromptError(
            f'{name}, line {number}: expected an object with a "sentence" string, '
            'like {"sentence": "The capital of France is"}'
        )
    return sentence


def prompt_files(folder: Path | None) -> list[str]:
    """Names of the prompt files directly inside ``folder`` (sorted), for the file picker."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES
    )


def check_prompt(prompt: str, limit: int | None) -> str:
    """``prompt`` if it is usable, else :class:`PromptError` saying how to fix it."""
    if not prompt.strip():
        raise PromptError("the prompt is empty; type some text to analyse")
    if limit is not None and len(prompt) > limit:
        raise PromptError(
            f"the prompt has {len(prompt)} characters, more than this server's limit of "
            f"{limit} (max_user_string_length); shorten it"
        )
    return prompt
