"""Shared fixtures: the packaged models (loaded once per session) and tiny models saved to disk.

Tests never touch the network: ``HF_HUB_OFFLINE`` is set in :func:`pytest_configure`, before any
test module imports ``huggingface_hub`` (which reads the variable once, at import), unless the
caller set it explicitly. The hub-offline tests stay meaningful: ``llm_flow.models.loading`` reads
the variable at call time, and the tests that need it unset remove it with ``monkeypatch``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llm_flow.config import default_config
from llm_flow.models import BridgeLlm, load_model

GEMMA_NAME = "Gemma-3-270M (packaged)"

SavedTiny = Callable[..., Path]


def f32_tol(magnitude: float = 1.0, terms: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """``terms · eps · magnitude``: the worst-case rounding error of a result computed from
    ``terms`` rounded operations (e.g. a sum of that many values) whose absolute values add up
    to ``magnitude``, in any order (Higham, *Accuracy and Stability of Numerical Algorithms*,
    §4.2: γ_n ≈ n·u with u = eps/2, so this also covers rounding on both sides of a comparison).
    A tolerance for results that may be summed in another order (chunking, thread counts,
    another implementation); ``dtype`` sets eps (float32: 2⁻²³ ≈ 1.19e-7). Where n is so large
    that the worst case would catch nothing, callers pass ``terms=isqrt(n)`` and say so: the
    random-walk estimate of n independent roundings (Higham & Mary, SISC 2019)."""
    return terms * torch.finfo(dtype).eps * magnitude


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def packaged_llm() -> BridgeLlm:
    """The config's default model (packaged SmolLM2-135M-Instruct), float32 on the CPU."""
    config = default_config()
    return load_model(config.model(config.default_model), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gemma_llm() -> BridgeLlm:
    """The packaged Gemma 3 270M base model, float32 on the CPU."""
    return load_model(default_config().model(GEMMA_NAME), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> SavedTiny:
    """``saved_tiny(arch, seed=0)`` → a folder holding a tiny HF model and its tokenizer
    (``save_pretrained``), written once per (arch, seed) per session."""
    from tests.tiny import tiny_hf_model, tiny_tokenizer

    folders: dict[tuple[str, int], Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        if (arch, seed) not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            tiny_hf_model(arch, seed).save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
            folders[arch, seed] = folder
        return folders[arch, seed]

    return make
