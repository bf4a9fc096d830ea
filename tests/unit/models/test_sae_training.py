"""Training a tiny SAE on a tiny model: it runs in seconds, reconstructs better than the mean,
reads its corpus from a file or a folder, and refuses bad settings in words."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_flow.errors import SaeError
from llm_flow.models.sae import load_sae, save_sae
from llm_flow.models.sae_training import default_corpus, evaluate, read_corpus, train_sae
from tests.tiny import prompt, tiny_llm


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [prompt(400, seed=2), prompt(300, seed=3)]


@pytest.mark.parametrize(("architecture", "l1"), [("topk", 0.0), ("standard", 1e-3)])
def test_tiny_training_and_round_trip(
    texts: list[str], tmp_path: Path, architecture: str, l1: float
) -> None:
    llm = tiny_llm("llama-gqa")
    trained = train_sae(
        llm, 1, texts, d_sae=48, k=6, architecture=architecture, l1=l1,  # type: ignore[arg-type]
        steps=60, batch_size=128, window=32,
    )  # fmt: skip
    assert 0 < trained.explained_variance <= 1  # better than predicting the mean
    assert trained.l0 > 0 and (architecture != "topk" or trained.l0 <= 6)
    loaded = load_sae(save_sae(trained.sae, tmp_path / "sae"))
    assert loaded.hook == "blocks.1.hook_resid_post" and loaded.apply_b_dec_to_input
    x = torch.randn(20, 32)
    assert evaluate(loaded, x) == pytest.approx(evaluate(trained.sae, x))


def test_corpus_from_a_folder_and_the_default(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("w1 w2")
    (tmp_path / "b" / "c.txt").write_text("w3")
    (tmp_path / "skip.md").write_text("w4")
    assert read_corpus(tmp_path) == ["w1 w2", "w3"]
    assert default_corpus().is_file() or default_corpus().is_dir()
    with pytest.raises(SaeError, match="no corpus at"):
        read_corpus(tmp_path / "missing")


def test_bad_settings_are_refused(texts: list[str]) -> None:
    llm = tiny_llm("llama-gqa")
    with pytest.raises(SaeError, match="cannot exceed --d-sae"):
        train_sae(llm, 0, texts, d_sae=4, k=8)
    with pytest.raises(SaeError, match="cannot train a 'jumprelu'"):
        train_sae(llm, 0, texts, architecture="jumprelu")
    with pytest.raises(SaeError, match="too short"):
        train_sae(llm, 0, [""], d_sae=8, k=2)
