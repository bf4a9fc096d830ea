"""Fixtures of the model tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

# A Llama config.json small enough to build in milliseconds, in the format of config/shapes/.
TINY_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 256,
    "eos_token_id": 256,
}

ShapeFile = Callable[[int], Path]


@pytest.fixture
def shape_file(tmp_path: Path) -> ShapeFile:
    """Writes the tiny shape with ``n_layers`` layers to a JSON file and returns its path."""

    def write(n_layers: int) -> Path:
        path = tmp_path / f"tiny-{n_layers}.json"
        path.write_text(json.dumps(TINY_SHAPE | {"num_hidden_layers": n_layers}), "utf-8")
        return path

    return write
