"""The prompt files the explorer offers: those directly inside the config's ``prompts_dir``.

Reading a file is :func:`llm_flow.io.prompts.read_prompt_file`; which files a user may open is
decided by :meth:`llm_flow.config.AppConfig.prompt_file`, never here.
"""

from __future__ import annotations

from pathlib import Path

from llm_flow.config import AppConfig

# Listed in the prompt-file picker; other files in prompts_dir are not prompt files.
PROMPT_SUFFIXES = (".jsonl", ".txt")


def prompt_files(folder: Path | None) -> list[str]:
    """Names of the prompt files directly inside ``folder`` (sorted), for the file picker."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES
    )


def offered_files(cfg: AppConfig) -> list[str]:
    """The prompt files a user may open on this server: none in demo mode or when the config
    disallows loading files."""
    if cfg.demo_mode or not cfg.allow_loading_dataset_files:
        return []
    return prompt_files(cfg.prompts_dir)
