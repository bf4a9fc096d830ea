"""Fixtures of the app tests: a tiny random-weight model saved as a local HF folder, and a config
that points at it, so the app runs offline in seconds (no packaged model needed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

from tests.families import mamba_config
from tests.tiny import prompt, random_model, tiny_hf_model, tiny_tokenizer

ARCHS_IN_APP = ("llama-gqa", "neox-parallel", "qwen2-moe")

PROMPT_LIMIT = 120
# Tiny-model prompts (its vocabulary is w0 … w60); the first is the default.
PROMPTS = [prompt(6, seed=1), prompt(9, seed=2), prompt(4, seed=3)]
FILE_PROMPTS = [prompt(5, seed=4), prompt(7, seed=5)]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models saved like downloaded weights: sequential, parallel blocks, a mixture of
    experts, and a Mamba (unsupported)."""
    dirs = {}
    models: dict[str, Any] = {arch: tiny_hf_model(arch) for arch in ARCHS_IN_APP}
    models["mamba"] = random_model(mamba_config())  # a design llm-flow refuses
    for arch, model in models.items():  # transformers PreTrainedModels
        folder = tmp_path_factory.mktemp(f"model-{arch}")
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
            "tiny-moe": {"source": "local", "path": str(model_dirs["qwen2-moe"])},
            "tiny-mamba": {"source": "local", "path": str(model_dirs["mamba"])},
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


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, config_path: Path) -> None:
    """The app runs offline on the tiny models' config (AppTest modules use it for every test)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLM_FLOW_CONFIG", str(config_path))


# file id → (the file's bytes, when asked for; mime type; file name)
Downloads = dict[str, tuple[Callable[[], bytes], str | None, str | None]]


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> Downloads:
    """Every file the app hands to a download button, by file id.

    AppTest keeps a button's file in a media store that lives for one run only, and a deferred
    file (``data=`` a callable, built when clicked) only as that callable; the button names the
    file by its id (``url`` or ``deferred_file_id``), so recording what is stored lets a test
    read the bytes a user would download.
    """
    files: Downloads = {}
    store_file = MemoryMediaFileStorage.load_and_get_id
    defer = MediaFileManager.add_deferred

    def record(
        self: MemoryMediaFileStorage,
        path_or_data: str | bytes,
        mimetype: str,
        kind: Any,
        filename: str | None = None,
    ) -> str:
        file_id = store_file(self, path_or_data, mimetype, kind, filename)
        assert isinstance(path_or_data, bytes)
        files[file_id] = (lambda: path_or_data, mimetype, filename)
        return file_id

    def record_deferred(
        self: MediaFileManager,
        data: Callable[[], Any],
        mimetype: str | None,
        coordinates: str,
        file_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        file_id = defer(self, data, mimetype, coordinates, file_name=file_name, **kwargs)

        def content() -> bytes:
            value = data()
            return value.encode("utf-8") if isinstance(value, str) else bytes(value)

        files[file_id] = (content, mimetype, file_name)
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    monkeypatch.setattr(MediaFileManager, "add_deferred", record_deferred)
    return files
