"""SAE latents in the corpus index (llm_flow/analyses/corpus_index.py, io/index_store.py,
analyses/top_examples.py): a latent's top examples and histogram equal a brute-force pass over
every window of the corpus (the residual read through the model's own hooks, encoded by the
SAE), each example is reproduced by a fresh pass over its prefix, the index of a corpus is the
merge of its halves', and the index is keyed by the SAE's weights."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llm_flow.analyses.corpus_index import (
    EDGES,
    IndexSettings,
    check_saes,
    index_windows,
    merge,
    sae_entry,
)
from llm_flow.analyses.top_examples import latent_report, parse_latent
from llm_flow.errors import CorpusError, IndexNotFoundError, SaeError
from llm_flow.io.corpus import open_corpus, token_windows
from llm_flow.io.index_store import build_index, find_latent_index, load_index, save_index
from llm_flow.models.bridge import BridgeLlm
from llm_flow.models.sae import Sae, load_sae, save_sae
from tests.tiny import prompt, tiny_hf_model, tiny_tokenizer
from tests.unit.analyses.test_corpus_index import assert_same
from tests.unit.analyses.test_latents import D_SAE, random_sae

WINDOW, K = 12, 4
POST, MID = "blocks.1.hook_resid_post", "blocks.2.hook_resid_mid"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(prompt(15, seed=i) for i in range(16)) + "\n", "utf-8")
    return path


@functools.cache
def model(arch: str) -> BridgeLlm:
    return BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer())


def saes() -> list[Sae]:
    return [random_sae(POST, seed=0), random_sae(MID, seed=1, architecture="topk", k=5)]


def settings(llm: BridgeLlm, corpus: Path, layers: tuple[int, ...] = ()) -> IndexSettings:
    c = open_corpus(corpus)
    entries = check_saes(llm.info, saes())
    return IndexSettings(
        llm.info.name, "test", c.label, c.content_hash(), WINDOW, K, layers, entries
    )


def windows(llm: BridgeLlm, corpus: Path) -> list[tuple[int, tuple[int, ...]]]:
    return list(token_windows(llm, open_corpus(corpus), WINDOW))


def states(llm: BridgeLlm, ids: tuple[int, ...], hook: str) -> torch.Tensor:
    """The residual at ``hook`` [T, D] from a pass through the model's own hooks (the middle
    residual of parallel blocks: the residual plus what attention wrote)."""
    got: dict[str, torch.Tensor] = {}

    def grab(name: str) -> Any:
        def hook_fn(tensor: torch.Tensor, hook: Any) -> None:
            got[name] = tensor[0].detach()

        return hook_fn

    layer = hook.split(".")[1]
    if hook.endswith("mid") and llm.info.parallel_blocks:
        names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out"]
        llm.logits_with_hooks(list(ids), [(n, grab(n)) for n in names])
        return got[names[0]] + got[names[1]]
    llm.logits_with_hooks(list(ids), [(hook, grab(hook))])
    return got[hook]


def brute_force(
    llm: BridgeLlm, ws: list[tuple[int, tuple[int, ...]]], sae: Sae
) -> tuple[list[list[tuple[float, int, int]]], np.ndarray]:
    """Per latent every (activation, window, position) of the corpus (first positions left
    out), in the index's order, and the histogram of each latent's activations."""
    samples: list[list[tuple[float, int, int]]] = [[] for _ in range(sae.d_sae)]
    assert sae.hook is not None
    values = []
    for number, ids in ws:
        acts = sae.encode(states(llm, ids, sae.hook).float())[1:]  # [T − 1, d_sae]
        values.append(acts)
        for position, row in enumerate(acts.tolist(), start=1):
            for unit, value in enumerate(row):
                samples[unit].append((value, number, position))
    for unit_samples in samples:
        unit_samples.sort(key=lambda s: (-s[0], s[1], s[2]))
    every = torch.cat(values)  # [N, d_sae]
    bins = torch.bucketize(every.T.contiguous(), torch.from_numpy(EDGES["activation"]), right=True)
    n_bins = len(EDGES["activation"]) + 1
    counts = np.stack([np.bincount(b.numpy(), minlength=n_bins) for b in bins])
    return samples, counts


@pytest.mark.parametrize("arch", ["llama-gqa", "neox-parallel"])
def test_top_examples_equal_a_brute_force_pass_over_the_corpus(
    corpus_file: Path, arch: str
) -> None:
    llm = model(arch)
    ws = windows(llm, corpus_file)
    index = index_windows(llm, ws, settings(llm, corpus_file), skip=1, batch_windows=5, saes=saes())
    assert set(index.top) == {("latent", 0), ("latent", 1)}
    for slot, sae in enumerate(saes()):
        expected, counts = brute_force(llm, ws, sae)
        top = index.top["latent", slot]
        assert top.values.shape == (D_SAE, K)
        for unit in range(D_SAE):
            want = expected[unit][:K]
            got_values = top.values[unit].tolist()
            assert got_values == pytest.approx([v for v, _, _ in want], rel=1e-5, abs=1e-6)
            # Ties (a top-k SAE's zeros) fall to the earlier window and position, as here.
            assert list(zip(top.windows[unit], top.positions[unit], strict=True)) == [
                (w, p) for _, w, p in want
            ], (slot, unit)
        assert np.array_equal(index.histograms["latent", slot, "activation"], counts)
        assert (counts.sum(1) == index.n_tokens).all()


def test_reports_reproduce_each_example_by_a_fresh_pass(corpus_file: Path) -> None:
    llm = model("llama-gqa")
    index = index_windows(
        llm, windows(llm, corpus_file), settings(llm, corpus_file), skip=1, saes=saes()
    )
    sae = saes()[0]
    report = latent_report(llm, index, 0, 7, k=3)
    data = report.to_dict()
    assert data["unit"] == f"latent {POST}:7" and data["kind"] == "latent"
    assert data["hook"] == POST and data["layer"] == 1 and data["index"] == 7
    assert data["measure"] == "activation" and len(data["examples"]) == 3
    assert data["explanation"]["text"].count(f"latent {POST}:7") == 1
    for example in report.examples:
        prefix = example.token_ids[: example.position + 1]
        fresh = sae.encode(states(llm, prefix, POST)[-1].float())[7]
        assert example.activation == pytest.approx(float(fresh), rel=1e-4, abs=1e-6)
    with pytest.raises(CorpusError, match=r"valid: 0\.\.39"):
        latent_report(llm, index, 0, D_SAE)


def test_the_index_of_a_corpus_is_the_merge_of_its_halves_and_reads_back(
    corpus_file: Path, tmp_path: Path
) -> None:
    llm = model("llama-gqa")
    ws, s = windows(llm, corpus_file), settings(llm, corpus_file, layers=(0,))
    whole = index_windows(llm, ws, s, skip=1, batch_windows=4, saes=saes())
    first = index_windows(llm, ws[:7], s, skip=1, batch_windows=3, saes=saes())
    second = index_windows(llm, ws[7:], s, skip=1, batch_windows=2, saes=saes())
    assert {key for key in whole.top} == {("neuron", 0), ("head", 0), ("latent", 0), ("latent", 1)}
    assert_same(merge(first, second), whole)
    save_index(whole, tmp_path / "index")
    assert_same(load_index(tmp_path / "index"), whole)
    with pytest.raises(CorpusError, match="not the ones"):
        index_windows(llm, ws, s, skip=1, saes=saes()[::-1])


def test_the_index_is_keyed_by_the_saes_weights(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    llm = model("llama-gqa")
    first = save_sae(random_sae(POST, seed=0), tmp_path / "a")
    built = build_index(llm, corpus_file, window=WINDOW, k=K, saes=[load_sae(first)])
    assert built.settings.layers == () and [k for k, _ in built.top] == ["latent"]
    assert built.settings.saes == (sae_entry(load_sae(first)),)
    copy = save_sae(random_sae(POST, seed=0), tmp_path / "b")  # same weights, elsewhere
    index, slot = find_latent_index(llm, corpus_file, load_sae(copy))
    assert index.path == built.path and slot == 0
    other = random_sae(POST, seed=2)
    with pytest.raises(IndexNotFoundError, match="covers the latents"):
        find_latent_index(llm, corpus_file, other)
    rebuilt = build_index(llm, corpus_file, window=WINDOW, k=K, saes=[other])
    assert rebuilt.path != built.path
    assert not np.array_equal(rebuilt.top["latent", 0].values, built.top["latent", 0].values)


def test_saes_and_latent_names_are_checked() -> None:
    llm = model("llama-gqa")
    assert parse_latent(f"{POST}:12") == (POST, 12)
    for bad in (POST, f"{POST}:x", "12"):
        with pytest.raises(CorpusError, match="HOOK:INDEX"):
            parse_latent(bad)
    with pytest.raises(SaeError, match="not a residual hook"):
        parse_latent("blocks.1.attn:3")
    with pytest.raises(CorpusError, match="3 layers"):
        check_saes(llm.info, [random_sae("blocks.3.hook_resid_pre")])
    with pytest.raises(CorpusError, match="16-dimensional"):
        check_saes(llm.info, [random_sae(POST, d_in=16)])
    with pytest.raises(CorpusError, match="twice"):
        check_saes(llm.info, [random_sae(POST), random_sae(POST)])
    with pytest.raises(CorpusError, match="names no hook"):
        check_saes(llm.info, [random_sae(None)])  # type: ignore[arg-type]
