"""Prompt-file listing and prompt checks for the explorer (reading files is
:func:`llm_flow.io.prompts.read_prompt_file`; which files a user may open is decided by
:meth:`llm_flow.config.AppConfig.prompt_file`, never here).
"""

from __future__ import annotations

from pathlib import Path

from llm_flow.errors import PromptError

# Listed in the prompt-file picker; other files in prompts_dir are not prompt files.
PROMPT_SUFFIXES = (".jsonl", ".txt")


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
