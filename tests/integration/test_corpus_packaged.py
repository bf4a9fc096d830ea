"""The shipped corpus by the packaged model's tokenizer: at least 200k tokens (issue 13), as its
README says, and a small index of it whose best example a fresh pass reproduces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from llm_flow.io.corpus import default_corpus
from llm_flow.io.index_store import build_index
from llm_flow.models import BridgeLlm
from llm_flow.resources import default_corpus_dir

pytestmark = pytest.mark.integration


def test_the_shipped_corpus_holds_the_tokens_its_readme_states(packaged_llm: BridgeLlm) -> None:
    tokens = sum(len(packaged_llm.encode(text)) for text in default_corpus().texts())
    readme = (default_corpus_dir() / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"\*\*([\d,]+) tokens\*\*", readme)

    assert tokens >= 200_000
    assert stated is not None and int(stated.group(1).replace(",", "")) == tokens


def test_a_neurons_best_example_reproduces_in_the_packaged_model(
    packaged_llm: BridgeLlm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path))
    index = build_index(packaged_llm, layers=[2], window=32, k=3, max_tokens=32 * 8)
    top = index.top["neuron", 2]
    window, position = int(top.windows[7, 0]), int(top.positions[7, 0])
    prefix = index.windows[window][: position + 1]
    got: list[float] = []

    def grab(tensor: torch.Tensor, hook: object) -> None:
        got.append(float(tensor[0, -1, 7]))

    packaged_llm.logits_with_hooks(prefix, [(packaged_llm.hook_name("neurons", 2), grab)])
    assert got[0] == pytest.approx(float(top.values[7, 0]), rel=1e-4, abs=1e-5)
