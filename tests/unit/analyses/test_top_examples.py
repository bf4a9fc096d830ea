"""Tests for llm_flow/analyses/top_examples.py through the Python API (``lf.build_index``,
``lf.top_examples``): the report is the CLI's JSON, the examples decode the index's windows, and
the automatic explanation counts the examples' tokens and reads the lens at the best one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import llm_flow as lf
from llm_flow.analyses.lens import expert_update, neuron_update, promoted_suppressed
from llm_flow.analyses.top_examples import LABEL, SUMMARY_TOKENS
from llm_flow.engine.trace import trace
from llm_flow.errors import CorpusError, IndexNotFoundError
from tests.tiny import WORDS, prompt, tiny_llm


@pytest.fixture
def corpus_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(prompt(10, seed=i) for i in range(10)), "utf-8")
    return path


@pytest.mark.parametrize(("arch", "kind"), [("llama-gqa", "neuron"), ("qwen2-moe", "expert")])
def test_the_explanation_counts_the_examples_and_reads_the_lens_at_the_best(
    corpus_file: Path, arch: str, kind: str
) -> None:
    llm = tiny_llm(arch)
    index = lf.build_index(llm, corpus_file, layers=[1], window=8, k=6)
    report = lf.top_examples(llm, kind, 1, 2, corpus=corpus_file)

    assert report.to_dict()["unit"] == f"{kind} 1.2" and len(report.examples) == 6
    best = report.examples[0]
    assert best.token_ids in index.windows.values()
    explanation = report.explanation
    assert explanation["label"] == LABEL and explanation["text"].startswith(LABEL)
    counts = Counter(e.token for e in report.examples)
    assert explanation["top_tokens"] == [list(c) for c in counts.most_common(SUMMARY_TOKENS)]
    assert sum(n for _, n in explanation["preceding_tokens"]) <= len(report.examples)
    # The promoted tokens are the lens's, on a full trace of the best example's context.
    words = [WORDS[i - 3] for i in best.token_ids[1 : best.position + 1]]
    tr = trace(llm, " ".join(words))
    assert tr.token_ids == best.token_ids[: best.position + 1]
    update = (neuron_update if kind == "neuron" else expert_update)(tr.run, 1, 2, best.position)
    up, down = promoted_suppressed(tr, update, best.position, k=SUMMARY_TOKENS)
    assert explanation["promoted"] == [s.token for s in up]
    assert explanation["suppressed"] == [s.token for s in down]


def test_a_head_report_and_the_errors(corpus_file: Path) -> None:
    llm = tiny_llm("llama-gqa")
    with pytest.raises(IndexNotFoundError, match="covers layer 0"):
        lf.top_examples(llm, "head", 0, 1, corpus=corpus_file)
    index = lf.build_index(llm, corpus_file, layers=[0], window=8, k=3)
    report = lf.top_examples(llm, "head", 0, 1, k=2, index=index)

    assert len(report.examples) == 2 and report.examples[0].attention_away is not None
    assert "promoted" not in report.explanation
    assert set(report.histogram) == {"measure", "edges", "counts", "attention_away"}
    with pytest.raises(CorpusError, match="valid kinds are neuron, head, expert, latent"):
        lf.top_examples(llm, "synapse", 0, 1, index=index)
    with pytest.raises(CorpusError, match=r"SAE's hook and its index \(HOOK:INDEX\)"):
        lf.top_examples(llm, "latent", 0, 1, index=index)
    with pytest.raises(CorpusError, match="head 4 does not exist in layer 0; valid: 0..3"):
        lf.top_examples(llm, "head", 0, 4, index=index)


def test_a_latent_report_through_the_api(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_flow.models.sae import save_sae, trained_sae_dir
    from tests.unit.analyses.test_latents import random_sae

    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    llm = tiny_llm("llama-gqa")
    hook = "blocks.1.hook_resid_post"
    folder = save_sae(random_sae(hook), trained_sae_dir(llm.info.name, hook))
    with pytest.raises(IndexNotFoundError, match="covers the latents"):
        lf.top_latent_examples(llm, f"{hook}:2", corpus=corpus_file)
    index = lf.build_index(llm, corpus_file, window=8, k=3, saes=[hook])  # the trained SAE
    assert index.settings.saes[0][:2] == (hook, str(folder))
    found = lf.top_latent_examples(llm, f"{hook}:2", k=2, corpus=corpus_file)  # the trained SAE
    given = lf.top_latent_examples(llm, f"{hook}:2", sae=folder, k=2, index=index)
    assert found.to_dict() == given.to_dict()
    assert found.name == f"latent {hook}:2" and len(found.examples) == 2
    other = random_sae(hook, seed=5)
    with pytest.raises(IndexNotFoundError, match="does not cover the latents"):
        lf.top_latent_examples(llm, f"{hook}:2", sae=other, index=index)
