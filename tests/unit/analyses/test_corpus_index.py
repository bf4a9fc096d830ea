"""Tests for llm_flow/analyses/corpus_index.py and llm_flow/io/index_store.py on tiny models.

Every top example is recomputed by a fresh forward pass over ``token_ids[:position + 1]`` through
the model's own hooks (not the index's code); the index of a corpus equals the merge of the
indexes of its two halves, bit for bit, histograms included; a saved index reads back equal, and
building the same index twice reads the cache.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llm_flow.analyses.corpus_index import (
    EDGES,
    CorpusIndex,
    IndexSettings,
    index_windows,
    merge,
    parse_layers,
)
from llm_flow.analyses.lens import head_update
from llm_flow.errors import CorpusError
from llm_flow.io.corpus import open_corpus, token_windows
from llm_flow.io.index_store import build_index, load_index, save_index
from llm_flow.models.bridge import BridgeLlm
from tests.tiny import prompt, tiny_hf_model, tiny_tokenizer

WINDOW, K = 12, 4
N_LINES = 24  # 24 × 15 words: 33 windows of 11 words (+ BOS)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(prompt(15, seed=i) for i in range(N_LINES)) + "\n", "utf-8")
    return path


@functools.cache
def model(arch: str) -> tuple[BridgeLlm, torch.nn.Module]:
    hf = tiny_hf_model(arch)
    return BridgeLlm(arch, hf, tiny_tokenizer()), hf


def settings(llm: BridgeLlm, corpus: Path, layers: tuple[int, ...] = (0, 1, 2)) -> IndexSettings:
    c = open_corpus(corpus)
    return IndexSettings(llm.info.name, "test", c.label, c.content_hash(), WINDOW, K, layers)


def windows(llm: BridgeLlm, corpus: Path) -> list[tuple[int, tuple[int, ...]]]:
    return list(token_windows(llm, open_corpus(corpus), WINDOW))


def index_of(llm: BridgeLlm, corpus: Path, batch: int = 4) -> CorpusIndex:
    return index_windows(
        llm, windows(llm, corpus), settings(llm, corpus), skip=1, batch_windows=batch
    )


@functools.cache
def fresh(llm: BridgeLlm, hf: torch.nn.Module, ids: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Per layer, the last position's neurons, head output norms, attention away shares and
    router weights, from one pass through the model's hooks and the HF weights (cached: many
    examples share a context)."""
    got: dict[tuple[int, str], torch.Tensor] = {}

    def grab(key: tuple[int, str]) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            got[key] = tensor.detach()

        return hook

    info = llm.info
    hooks = []
    for layer in range(info.n_layers):
        sites = ["z", "pattern"] + (["experts"] if layer in info.moe_layers else ["neurons"])
        hooks += [(llm.hook_name(s, layer), grab((layer, s))) for s in sites]
    llm.logits_with_hooks(list(ids), hooks)
    found: dict[int, dict[str, Any]] = {}
    for layer in range(info.n_layers):
        out: dict[str, Any] = {"attention_away": 1 - got[layer, "pattern"][0, :, -1, 0]}
        z = got[layer, "z"][0, -1].flatten().view(info.n_heads, -1)  # [H, d_head]
        W_O = hf.model.layers[layer].self_attn.o_proj.weight.detach()  # [D, H · d_head]
        per_head = W_O.T.view(info.n_heads, -1, W_O.shape[0])  # [H, d_head, D]
        out["output_norm"] = torch.einsum("hk,hkd->hd", z, per_head).norm(dim=-1)
        if (layer, "neurons") in got:
            out["activation"] = got[layer, "neurons"][0, -1]
        else:
            out["router_weight"] = got[layer, "experts"][0, -1]
        found[layer] = out
    return found


@pytest.mark.parametrize(
    ("arch", "kind", "measure"),
    [
        ("llama-gqa", "neuron", "activation"),
        ("llama-gqa", "head", "output_norm"),
        ("qwen2-moe", "expert", "router_weight"),
    ],
)
def test_every_top_example_is_reproduced_by_a_fresh_forward_pass(
    corpus_file: Path, arch: str, kind: str, measure: str
) -> None:
    llm, hf = model(arch)
    index = index_of(llm, corpus_file)
    checked = 0
    for (k, layer), top in index.top.items():
        if k != kind:
            continue
        assert np.all(np.diff(top.values, axis=1) <= 0)  # best first
        for unit, rank in np.ndindex(*top.values.shape):
            ids = index.windows[int(top.windows[unit, rank])]
            position = int(top.positions[unit, rank])
            assert position >= 1  # the BOS position is never an example
            want = fresh(llm, hf, ids[: position + 1])[layer]
            value = float(top.values[unit, rank])
            assert value == pytest.approx(float(want[measure][unit]), rel=1e-4, abs=1e-6)
            if kind == "head":
                away = float(want["attention_away"][unit])
                assert float(top.extra[unit, rank]) == pytest.approx(away, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked >= 3 * K


def assert_same(a: CorpusIndex, b: CorpusIndex) -> None:
    assert a.settings == b.settings and a.spans == b.spans and a.n_tokens == b.n_tokens
    assert a.top.keys() == b.top.keys() and a.histograms.keys() == b.histograms.keys()
    for key in a.top:
        for field in ("values", "windows", "positions", "extra"):
            x, y = getattr(a.top[key], field), getattr(b.top[key], field)
            assert np.array_equal(x, y, equal_nan=True), (key, field)
    for key in a.histograms:
        assert np.array_equal(a.histograms[key], b.histograms[key]), key
    assert dict(a.windows) == dict(b.windows)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-moe"])
def test_the_index_of_a_corpus_is_the_merge_of_the_indexes_of_its_halves(
    corpus_file: Path, arch: str
) -> None:
    llm, _ = model(arch)
    ws, s = windows(llm, corpus_file), settings(llm, corpus_file)
    whole = index_windows(llm, ws, s, skip=1, batch_windows=4)
    first = index_windows(llm, ws[:13], s, skip=1, batch_windows=5)  # not at a batch boundary
    second = index_windows(llm, ws[13:], s, skip=1, batch_windows=3)

    assert whole.spans == ((0, len(ws)),)
    assert_same(merge(first, second), whole)
    assert_same(merge(second, first), whole)
    for (kind, layer, name), counts in whole.histograms.items():
        assert counts.shape[1] == len(EDGES[name]) + 1
        assert (counts.sum(1) == whole.n_tokens).all(), (kind, layer, name)
    with pytest.raises(CorpusError, match="share windows"):
        merge(whole, first)
    other = index_windows(llm, ws[13:], settings(llm, corpus_file, (1,)), skip=1)
    with pytest.raises(CorpusError, match="cannot be merged"):
        merge(first, other)


def test_a_saved_index_reads_back_equal(corpus_file: Path, tmp_path: Path) -> None:
    llm, _ = model("qwen2-moe")
    index = index_of(llm, corpus_file)
    save_index(index, tmp_path / "index")

    assert_same(load_index(tmp_path / "index"), index)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"


def test_building_the_same_index_twice_reads_the_cache(
    corpus_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm, _ = model("llama-gqa")
    built = build_index(llm, corpus_file, layers=[1], window=WINDOW, k=K)
    assert built.path is not None and built.path.parent == cache / "corpus-index"
    with monkeypatch.context() as m:
        m.setattr(llm, "run", lambda *a, **kw: pytest.fail("the cached index was rebuilt"))
        again = build_index(llm, corpus_file, layers=[1], window=WINDOW, k=K)
    assert again.path == built.path
    assert_same(again, built)
    assert built.settings.layers == (1,) and {layer for _, layer in built.top} == {1}
    smaller = build_index(llm, corpus_file, layers=[1], window=WINDOW, k=K, max_tokens=30)
    assert smaller.path != built.path and smaller.n_windows == 3  # 30 tokens → 3 windows of 12


def test_layers_parse_and_are_checked() -> None:
    assert parse_layers("0,3,5-7") == [0, 3, 5, 6, 7]
    with pytest.raises(CorpusError, match="0,3,5-7"):
        parse_layers("0,x")
    llm, _ = model("llama-gqa")
    with pytest.raises(CorpusError, match=r"layer 3 does not exist; valid layers are 0\.\.2"):
        build_index(llm, None, layers=[3])


@pytest.mark.parametrize("arch", ["gemma3-postnorm", "neox-parallel", "gpt2-bias"])
def test_other_families_heads_match_the_lens_and_neurons_the_hook(
    corpus_file: Path, arch: str
) -> None:
    """Post-norm (the head's write scaled by the norm), parallel blocks and biased heads: each
    head's best value is the norm of the lens's head update on a fresh run of its context."""
    llm, _ = model(arch)
    s = settings(llm, corpus_file, (1,))
    index = index_windows(llm, windows(llm, corpus_file)[:6], s, skip=1)
    heads, neurons = index.top["head", 1], index.top["neuron", 1]
    for unit in range(heads.values.shape[0]):
        ids = index.windows[int(heads.windows[unit, 0])]
        position = int(heads.positions[unit, 0])
        run = llm.run(list(ids[: position + 1]))
        want = head_update(run, 1, unit, position).norm()
        assert float(heads.values[unit, 0]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    got: list[torch.Tensor] = []
    ids = index.windows[int(neurons.windows[5, 0])]
    position = int(neurons.positions[5, 0])
    hook = (llm.hook_name("neurons", 1), lambda tensor, hook: got.append(tensor[0, -1, 5]))
    llm.logits_with_hooks(list(ids[: position + 1]), [hook])
    assert float(neurons.values[5, 0]) == pytest.approx(float(got[0]), rel=1e-4, abs=1e-6)
