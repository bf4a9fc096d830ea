"""QK attribution (llm_flow/analyses/attend.py) on every tiny family: the terms sum to the model's
own score, checked against what the model computed without llm-flow's decomposition (the
attention pattern's log-ratios, the HF model's own weights in float64).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from llm_flow.analyses.attend import REMAINDER, Attend, attend, residual_parts
from llm_flow.engine.trace import Trace, trace
from llm_flow.errors import AttendError, PositionError, SelfCheckError
from llm_flow.models import qk, wrap_hf
from llm_flow.models.checks import relative_error
from tests.families import FAMILIES
from tests.tiny import random_model, tiny_tokenizer

PROMPT = " ".join(f"w{i}" for i in (5, 17, 3, 42, 8, 23, 11, 30, 2))  # 10 tokens with BOS
LAYER, HEAD, QUERY, SOURCE = 1, 3, 9, 7  # the source inside the sliding windows of 4
RTOL = 1e-4


@functools.cache
def _trace(name: str) -> Trace:
    hf = random_model(FAMILIES[name].config())
    llm = wrap_hf(name, hf, tiny_tokenizer(), device="cpu", dtype=torch.float32)
    return trace(llm, PROMPT)


@functools.cache
def _attend(name: str) -> Attend:
    return attend(_trace(name), LAYER, HEAD, QUERY, SOURCE, top=None)


def _total(terms: list[dict[str, float]]) -> float:
    return math.fsum(term["value"] for term in terms)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_terms_sum_to_the_models_score(name: str) -> None:
    result = _attend(name)
    data = result.to_json()
    row = _trace(name).run.layers[LAYER].pattern[HEAD, QUERY].double()  # [T], the model's own
    seen = row > 0
    others = seen.clone()
    others[SOURCE] = False
    # Independent of the capture: softmax log-ratios are score differences.
    logs = row.log()
    expected = float(logs[SOURCE] - logs[others].mean())
    assert result.contrast is not None and result.others == int(others.sum())
    width = float(logs[seen].abs().max())
    assert abs(result.contrast.score - expected) <= RTOL * max(width, 1.0)
    if result.bilinear:  # the bilinear terms alone give the model's score difference
        assert abs(result.contrast.terms_sum - expected) <= RTOL * max(width, 1.0)
    assert data["attention"] == pytest.approx(float(row[SOURCE]), rel=1e-5)
    for split in (data, data["contrast"]):
        bound = RTOL * max(abs(split["score"]), 1.0)
        if result.bilinear:  # the bilinear sum is the whole score
            assert abs(split["terms_sum"] - split["score"]) <= bound
        # With every term listed, each table sums to the score (the remainder is its own term).
        assert abs(_total(split["query_terms"]) - split["score"]) <= bound
        assert abs(_total(split["key_terms"]) - split["score"]) <= bound
        assert abs(_total(split["pairs"]) - split["terms_sum"]) <= bound
        names = {t["component"] for t in split["query_terms"]}
        assert {f"X0_{QUERY}", f"A0_{QUERY}.h0", f"M0_{QUERY}", "bias"} <= names
        keys = {t["component"] for t in split["key_terms"]}
        assert {f"X0_{SOURCE}", f"A0_{SOURCE}.h{HEAD}", f"M0_{SOURCE}", "bias"} <= keys
        assert (REMAINDER in names) == (not result.bilinear)


def test_non_bilinear_scores_keep_their_remainder() -> None:
    # ALiBi adds a position term q · k cannot hold; softcapping bends the score.
    assert not _attend("Bloom").bilinear and not _attend("MPT").bilinear
    assert abs(_attend("MPT").direct.remainder) > 1e-3
    assert not _attend("Gemma 2").bilinear
    assert _attend("Llama 3").bilinear and abs(_attend("Llama 3").direct.remainder) < 1e-6


def test_top_lists_are_the_largest_terms_in_order() -> None:
    full, short = _attend("Qwen2"), attend(_trace("Qwen2"), LAYER, HEAD, -1, -3, top=3)
    assert (short.query, short.source) == (QUERY, SOURCE)
    assert len(short.direct.query_terms) == len(short.direct.pairs) == 3
    assert short.direct.query_terms == full.direct.query_terms[:3]
    values = [abs(t.value) for t in full.direct.key_terms]
    assert values == sorted(values, reverse=True)
    assert short.direct.terms_sum == pytest.approx(full.direct.terms_sum, rel=1e-9)


def test_the_projection_biases_are_the_bias_term() -> None:
    # Qwen2: randomized q/k projection biases, an RMSNorm without bias and no output bias: the
    # bias term is the biases' image alone, and it is not small.
    result = _attend("Qwen2")
    bias = next(t.value for t in result.direct.query_terms if t.component == "bias")
    assert abs(bias) > 100 * RTOL * abs(result.direct.score)


@pytest.mark.parametrize("drop", ["gain", "bias"])
def test_a_dropped_norm_gain_or_bias_fails_the_self_check(
    monkeypatch: pytest.MonkeyPatch, drop: str
) -> None:
    # GPT-2's LayerNorms have randomized gains and biases: a map without either misses the
    # model's queries, and the call raises rather than return a table.
    real = qk.norm_affine

    def dropped(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        gain, bias = real(*args, **kwargs)
        return (torch.ones_like(gain), bias) if drop == "gain" else (gain, torch.zeros_like(bias))

    monkeypatch.setattr(qk, "norm_affine", dropped)
    with pytest.raises(SelfCheckError, match="self-check failed"):
        attend(_trace("GPT-2"), LAYER, HEAD, QUERY, SOURCE)


def test_the_parts_rebuild_the_model_query() -> None:
    tr = _trace("Qwen2")
    cap = tr.llm.qk_capture(tr.run.token_ids, LAYER)
    parts = torch.cat([block for _, block in residual_parts(tr.run, LAYER, QUERY + 1)])
    whole = torch.zeros(1, tr.n_tokens, parts.shape[-1])
    whole[0, : QUERY + 1] = parts.sum(0)
    q, k = cap.project(whole)
    assert relative_error(q[0, QUERY], cap.queries[QUERY]) <= RTOL
    assert relative_error(k[0, : QUERY + 1], cap.keys[: QUERY + 1]) <= RTOL


@pytest.mark.parametrize(
    ("args", "error", "needle"),
    [
        ((2, 0, -1, 0), AttendError, "layer 2 is out of range; valid layers are 0..1"),
        ((0, 4, -1, 0), AttendError, "head 4 is out of range"),
        ((0, 0, 10, 0), PositionError, "position 10 is outside"),
        ((0, 0, 3, 5), AttendError, "source 5 comes after query 3"),
        ((0, 0, -1, 2), AttendError, "cannot see source 2"),  # Mistral's window of 4
    ],
)
def test_bad_edges_are_refused_in_words(
    args: tuple[int, int, int, int], error: type[Exception], needle: str
) -> None:
    with pytest.raises(error, match=needle):
        attend(_trace("Mistral"), *args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name", ["Llama 3", "GPT-2", "Qwen3", "GPT-NeoX", "Mistral", "DeepSeek-V3"]
)
def test_half_precision_models_split_within_their_tolerance(name: str, dtype: torch.dtype) -> None:
    # Half-precision activations: the checks loosen by dtype as the graph's do (RTOL of
    # llm_flow.models.checks), and the LayerNorm/RMSNorm probe still tells them apart.
    hf = random_model(FAMILIES[name].config())
    tr = trace(wrap_hf(name, hf, tiny_tokenizer(), device="cpu", dtype=dtype), PROMPT)
    result = attend(tr, LAYER, HEAD, QUERY, SOURCE, top=None)
    fp32 = _attend(name)
    assert result.others == fp32.others  # a half mask's -65504 is masked too (Mistral's window)
    assert result.direct.score == pytest.approx(fp32.direct.score, abs=0.05)
    assert abs(result.direct.remainder) <= 0.05 * max(abs(result.direct.score), 0.1)


@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n].experts])
def test_experts_split_their_blocks_term(name: str) -> None:
    # Linear map, so a block's term is the sum of its experts' (and its shared expert's) terms;
    # whatever the block writes beyond its experts (an output bias) joins "bias".
    whole = _attend(name)
    split = attend(_trace(name), LAYER, HEAD, QUERY, SOURCE, top=None, experts=True)
    assert split.direct.terms_sum == pytest.approx(whole.direct.terms_sum, abs=1e-6)
    block = next(t.value for t in whole.direct.query_terms if t.component == f"M0_{QUERY}")
    parts = [t for t in split.direct.query_terms if t.component.startswith(f"M0_{QUERY}.")]
    if 0 not in _trace(name).llm.info.moe_layers:  # GLM-4-MoE: a dense first layer stays whole
        assert not parts and split.direct.query_terms == whole.direct.query_terms
        return
    assert len(parts) >= 2 and all(t.component[len(f"M0_{QUERY}.") :][0] in "es" for t in parts)
    bias_shift = sum(
        t.value * s
        for s, a in ((1, split), (-1, whole))
        for t in a.direct.query_terms
        if t.component == "bias"
    )
    assert math.fsum(t.value for t in parts) + bias_shift == pytest.approx(block, abs=1e-5)
