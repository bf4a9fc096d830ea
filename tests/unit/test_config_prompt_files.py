"""Tests for AppConfig.prompt_file: the only way to open a user-chosen prompt file (inside the
config's prompts_dir, no escapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_flow.config import AppConfig, ModelSpec
from llm_flow.errors import PromptError


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "ioi.txt").write_text("When Mary and John went to the store, John gave a drink to\n")
    (tmp_path / "secret.txt").write_text("no")
    return folder


def _with_prompts(folder: Path | None, **kwargs: Any) -> AppConfig:
    return AppConfig(
        models=(ModelSpec("gpt2", "hub"),), default_model="gpt2", prompts_dir=folder, **kwargs
    )


def test_prompt_file_inside_prompts_dir(prompts: Path) -> None:
    cfg = _with_prompts(prompts)
    assert cfg.prompt_file("ioi.txt") == (prompts / "ioi.txt").resolve()
    assert cfg.prompt_file(prompts / "ioi.txt") == (prompts / "ioi.txt").resolve()


@pytest.mark.parametrize("name", ["../secret.txt", "SECRET", "/etc/passwd"])
def test_prompt_file_refuses_paths_outside(prompts: Path, name: str) -> None:
    name = str(prompts.parent / "secret.txt") if name == "SECRET" else name
    with pytest.raises(PromptError, match="outside the prompts folder"):
        _with_prompts(prompts).prompt_file(name)


def test_prompt_file_refuses_symlink_escape(prompts: Path) -> None:
    (prompts / "link.txt").symlink_to(prompts.parent / "secret.txt")
    with pytest.raises(PromptError, match="outside"):
        _with_prompts(prompts).prompt_file("link.txt")


def test_prompt_file_missing_lists_available(prompts: Path) -> None:
    with pytest.raises(PromptError, match="available files are 'ioi.txt'"):
        _with_prompts(prompts).prompt_file("factual.txt")


def test_prompt_file_disabled(prompts: Path) -> None:
    with pytest.raises(PromptError, match="disabled"):
        _with_prompts(prompts, demo_mode=True).prompt_file("ioi.txt")
    with pytest.raises(PromptError, match="disabled"):
        _with_prompts(prompts, allow_loading_dataset_files=False).prompt_file("ioi.txt")
    with pytest.raises(PromptError, match="prompts_dir"):
        _with_prompts(None).prompt_file("ioi.txt")
