"""Fixtures of the app tests: a tiny random-weight model saved as a local HF folder, and a config
that points at it, so the app runs offline in seconds (no packaged model needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import prompt, tiny_hf_model, tiny_tokenizer

PROMPT_LIMIT = 120
# Tiny-model prompts (its vocabulary is w0 … w60); the first is the default.
PROMPTS = [prompt(6, seed=1), prompt(9, seed=2), prompt(4, seed=3)]
FILE_PROMPTS = [prompt(5, seed=4), prompt(7, seed=5)]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models saved like downloaded weights: one sequential, one with parallel blocks."""
    dirs = {}
    for arch in ("llama-gqa", "neox-parallel"):
        folder = tmp_path_factory.mktemp(f"model-{arch}")
        model: Any = tiny_hf_model(arch)  # a transformers PreTrainedModel
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        dirs[arch] = folder
    return dirs


def write_config(folder: Path, model_dirs: dict[str, Path], *, demo_mode: bool = False) -> Path:
    prompts_dir = folder / "prompts"
    prompts_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"sentence": p}) for p in PROMPTS]
    (prompts_dir / "preloaded.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (prompts_dir / "more.txt").write_text("\n".join(FILE_PROMPTS) + "\n", encoding="utf-8")
    config = {
        "models": {
            "tiny": {"source": "local", "path": str(model_dirs["llama-gqa"])},
            "tiny-parallel": {"source": "local", "path": str(model_dirs["neox-parallel"])},
        },
        "default_model": "tiny",
        "demo_mode": demo_mode,
        "allow_loading_dataset_files": True,
        "preloaded_dataset_filename": "prompts/preloaded.jsonl",
        "prompts_dir": "prompts",
        "max_user_string_length": PROMPT_LIMIT,
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def config_path(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]) -> Path:
    return write_config(tmp_path_factory.mktemp("config"), model_dirs)


@pytest.fixture(scope="session")
def demo_config_path(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]) -> Path:
    return write_config(tmp_path_factory.mktemp("demo-config"), model_dirs, demo_mode=True)
