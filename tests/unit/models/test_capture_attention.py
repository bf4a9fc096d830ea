"""Tests for llm_flow/models/capture_attention.py: a capture pass's attention in causal query
blocks equals TransformerLens's own, on every family it serves, in blocks of a few rows."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import eager_attention_forward

from llm_flow.models import capture_attention, wrap_hf
from llm_flow.models.base import ModelRun
from llm_flow.models.bridge import BridgeLlm
from tests.conftest import f32_tol
from tests.families import FAMILIES
from tests.tiny import prompt, random_model, tiny_tokenizer

PROMPT = prompt(9)  # 10 tokens with BOS: in blocks of 3 rows, four blocks, the last one short
# float32 through two small layers, summed in other orders (as tests/unit/models/test_families).
RTOL = f32_tol(terms=3 * 128)
# Families whose eager attention is not Llama's: soft-capped scores, attention sinks.
OWN_EAGER = {"Gemma 2", "Gemma 3", "GPT-OSS"}


@functools.cache
def _llm(name: str) -> BridgeLlm:
    hf = random_model(FAMILIES[name].config())
    return wrap_hf(name, hf, tiny_tokenizer(), device="cpu", dtype=torch.float32)


SERVED = [n for n in FAMILIES if capture_attention._attention_components(_llm(n)._bridge)]


def rel_err(got: Tensor, want: Tensor) -> float:
    want = want.double()
    return float((got.double() - want).abs().max() / want.abs().max())


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the blocked attention (one per layer of a blocked pass)."""
    calls: list[int] = []
    blocked = capture_attention._blocked

    def counted(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        calls.append(1)
        return blocked(*args, **kwargs)

    monkeypatch.setattr(capture_attention, "_blocked", counted)
    return calls


def _bridge_run(llm: BridgeLlm, monkeypatch: pytest.MonkeyPatch) -> ModelRun:
    """The run with TransformerLens's own attention (the pass as it was before)."""
    with monkeypatch.context() as m:
        m.setattr(capture_attention, "_attention_components", lambda bridge: None)
        return llm.run(PROMPT)


def test_the_families_served_include_llama_and_mixtures() -> None:
    # Not vacuous: the comparisons below run on most of the matrix.
    assert {"Llama 3", "Mistral", "Qwen2", "Mixtral", "Gemma 2"} <= set(SERVED)
    assert "GPT-2" not in SERVED  # another bridge class: TransformerLens's pass, unchanged


@pytest.mark.parametrize("name", SERVED)
def test_a_blocked_run_is_the_bridges_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = _llm(name)
    want = _bridge_run(llm, monkeypatch)
    monkeypatch.setattr(capture_attention, "QUERY_BLOCK", 3)
    calls = _spy(monkeypatch)
    got = llm.run(PROMPT)
    # Generic families go through the blocks, one call per layer; the others their own eager.
    assert len(calls) == (0 if name in OWN_EAGER else got.n_layers)
    assert rel_err(got.logits, want.logits) <= RTOL
    for g, w in zip(got.layers, want.layers, strict=True):
        assert g.pattern is not None and w.pattern is not None
        assert rel_err(g.pattern, w.pattern) <= RTOL, f"layer {g.index}"
        assert torch.equal(g.pattern.triu(1), torch.zeros_like(g.pattern))
        assert rel_err(g.values, w.values) <= RTOL
        assert rel_err(g.attn_update, w.attn_update) <= RTOL
        assert rel_err(g.resid_post, w.resid_post) <= RTOL


def test_the_pass_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    llm = _llm("Llama 3")
    config = llm._bridge.blocks[0].attn.original_component.config
    before = config._attn_implementation

    def fails(layer: Any) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        llm.run(PROMPT, on_layer=fails)  # leaves the pass from inside a hook
    assert config._attn_implementation == before
    assert all("forward" not in block.attn.__dict__ for block in llm._bridge.blocks)
    assert not capture_attention._CAPTURES
    calls = _spy(monkeypatch)
    llm.logits_with_hooks(llm.tokenize(PROMPT), [])  # a plain pass: TransformerLens's attention
    assert calls == []


def test_an_intervened_run_keeps_transformer_lens_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    llm = _llm("Llama 3")
    calls = _spy(monkeypatch)
    name = llm.hook_name("pattern", 0)

    def uniform(pattern: Tensor, hook: Any) -> Tensor:
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    run = llm.run(PROMPT, fwd_hooks=[(name, uniform)])
    assert calls == []
    pattern = run.layers[0].pattern
    assert pattern is not None
    rows = torch.arange(1, pattern.shape[-1] + 1, dtype=pattern.dtype)
    assert torch.allclose(pattern[0].sum(-1), torch.ones(len(rows)))
    assert torch.allclose(pattern[0, :, 0], 1 / rows)  # the edit is what the run holds


def _mask(t: int, window: int | None = None) -> Tensor:
    """HF's additive causal mask [1, 1, T, T] (within a sliding ``window`` if given)."""
    hidden = torch.ones(t, t, dtype=torch.bool).triu(1)
    if window is not None:
        hidden |= torch.ones(t, t, dtype=torch.bool).tril(-window)
    return torch.zeros(t, t).masked_fill(hidden, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("block", [1, 3, 7, 64])
@pytest.mark.parametrize("window", [None, 4])
def test_blocks_are_llamas_eager_attention(
    block: int, window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_attention, "QUERY_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    t, d = 13, 8
    query = torch.randn(2, 6, t, d, generator=g)
    key, value = torch.randn(2, 2, t, d, generator=g), torch.randn(2, 2, t, d, generator=g)
    mask = _mask(t, window)
    module = torch.nn.Module()
    module.num_key_value_groups = 3  # type: ignore[assignment]
    module.training = False
    want_out, want_pattern = eager_attention_forward(module, query, key, value, mask, scaling=0.3)
    out, pattern = capture_attention._blocked(query, key, value, mask, 0.3)
    # Scores are d-long sums of products of unit normals (|q·k| ≲ 3·√d).
    assert torch.allclose(pattern, want_pattern, rtol=0, atol=f32_tol(terms=2 * d))
    assert torch.allclose(out, want_out, rtol=0, atol=f32_tol(magnitude=4, terms=2 * d + t))
    assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))


def test_only_a_causal_additive_mask_is_blocked() -> None:
    assert capture_attention._causal(_mask(5))
    assert capture_attention._causal(_mask(5, window=2))
    bidirectional = torch.zeros(1, 1, 5, 5)
    assert not capture_attention._causal(bidirectional)
    assert not capture_attention._causal(_mask(5).bool())
    assert not capture_attention._causal(_mask(5)[..., :4])


def test_a_model_split_over_devices_keeps_transformer_lens_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge = _llm("Llama 3")._bridge
    with capture_attention.capturing(bridge) as served:
        assert served
    monkeypatch.setattr(bridge.original_model, "hf_device_map", {"model": "cpu"}, raising=False)
    with capture_attention.capturing(bridge) as served:
        assert not served
        assert all("forward" not in block.attn.__dict__ for block in bridge.blocks)
