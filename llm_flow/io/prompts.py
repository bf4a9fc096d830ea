"""Prompt files: LLM-TT's JSON lines (``{"sentence": …}`` per line, ``*.jsonl``) or plain text
with one prompt per line (anything else). Used by the CLI, dataset mode and the app; which files
the app may open is decided by :meth:`llm_flow.config.AppConfig.prompt_file`, never here.
Messages name the file, not its full path (the app must not reveal server paths).
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_flow.errors import PromptError


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a file, in order, blank lines and duplicates dropped: LLM-TT's JSON lines
    (``{"sentence": …}`` per line, ``*.jsonl``) or plain text with one prompt per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read prompt file {path.name!r}: {exc}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if path.suffix.lower() == ".jsonl" and line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(f"{path.name}, line {number}: invalid JSON ({exc.msg})") from None
            sentence = record.get("sentence") if isinstance(record, dict) else None
            if not isinstance(sentence, str):
                raise PromptError(
                    f'{path.name}, line {number}: expected an object with a "sentence" string, '
                    'like {"sentence": "The capital of France is"}'
                )
            line = sentence
        prompts.append(line)
    unique = list(dict.fromkeys(p for p in prompts if p.strip()))
    if not unique:
        raise PromptError(f"prompt file {path.name!r} holds no prompts (one per line)")
    return unique
