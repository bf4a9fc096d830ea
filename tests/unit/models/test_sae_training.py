"""Training a tiny SAE on a tiny model: it runs in seconds, reconstructs better than the mean,
reads only the windows it needs, and refuses bad settings in words."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_flow.errors import SaeError
from llm_flow.io.corpus import open_corpus, token_windows
from llm_flow.models.sae import load_sae, save_sae
from llm_flow.models.sae_training import evaluate, residuals, train_sae
from tests.tiny import prompt, tiny_llm

Windows = list[tuple[int, ...]]


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Windows:
    """Token windows of 32 of a two-file corpus, cut by the corpus index's reader."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(prompt(400, seed=2))
    (folder / "b.txt").write_text(prompt(300, seed=3))
    llm = tiny_llm("llama-gqa")
    return [w.token_ids for w in token_windows(llm, open_corpus(folder), 32)]


@pytest.mark.parametrize(("architecture", "l1"), [("topk", 0.0), ("standard", 1e-3)])
def test_tiny_training_and_round_trip(
    texts: Windows, tmp_path: Path, architecture: str, l1: float
) -> None:
    llm = tiny_llm("llama-gqa")
    trained = train_sae(
        llm, 1, texts, d_sae=48, k=6, architecture=architecture, l1=l1,  # type: ignore[arg-type]
        steps=60, batch_size=128,
    )  # fmt: skip
    assert 0 < trained.explained_variance <= 1  # better than predicting the mean
    assert trained.l0 > 0 and (architecture != "topk" or trained.l0 <= 6)
    loaded = load_sae(save_sae(trained.sae, tmp_path / "sae"))
    assert loaded.hook == "blocks.1.hook_resid_post" and loaded.apply_b_dec_to_input
    x = torch.randn(20, 32)
    assert evaluate(loaded, x) == pytest.approx(evaluate(trained.sae, x))


def test_only_the_windows_needed_are_read(texts: Windows) -> None:
    """At most ``max_tokens`` rows (each window's first token left out), and the windows after
    them are never taken from the iterator (a corpus is read only as far as needed)."""
    llm = tiny_llm("llama-gqa")
    taken: list[int] = []

    def counted() -> Windows:
        for i, w in enumerate(texts):
            taken.append(i)
            yield w

    x, which = residuals(llm, counted(), "blocks.0.hook_resid_post", max_tokens=40)
    assert x.shape == (40, llm.info.d_model)
    assert which.tolist() == [0] * 31 + [1] * 9  # windows of 32 tokens, first token left out
    assert taken == [0, 1]


def test_bad_settings_are_refused(texts: Windows) -> None:
    llm = tiny_llm("llama-gqa")
    with pytest.raises(SaeError, match="cannot exceed --d-sae"):
        train_sae(llm, 0, texts, d_sae=4, k=8)
    with pytest.raises(SaeError, match="cannot train a 'jumprelu'"):
        train_sae(llm, 0, texts, architecture="jumprelu")
    with pytest.raises(SaeError, match="too short"):
        train_sae(llm, 0, [(5,)], d_sae=8, k=2)
