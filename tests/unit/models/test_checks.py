"""Tests for llm_flow/models/checks.py: each identity is checked, and a broken one names its
layer and block.

Real layers come from tiny models; each test corrupts one tensor of a :class:`LayerRun` with
``dataclasses.replace`` so exactly one identity breaks (the first one check_layer looks at).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import Tensor

from llm_flow.errors import LlmFlowError, SelfCheckError
from llm_flow.models.base import LayerRun
from llm_flow.models.checks import CHECKED_ROWS, RTOL, check_layer, checked_rows, relative_error
from tests.tiny import prompt, tiny_llm

LAYER = 2  # the last layer, so "layer 2" cannot be matched by an unrelated "layer 0"


@pytest.fixture(scope="module")
def layer() -> LayerRun:
    return tiny_llm("gpt2-bias").run(prompt(7)).layers[LAYER]


@pytest.fixture(scope="module")
def parallel_layer() -> LayerRun:
    return tiny_llm("neox-parallel").run(prompt(7)).layers[LAYER]


@pytest.fixture(scope="module")
def postnorm_layer() -> LayerRun:
    return tiny_llm("gemma3-postnorm").run(prompt(7)).layers[LAYER]


def bumped(t: Tensor, relative: float = 1e-2) -> Tensor:
    """``t`` with one entry moved by ``relative`` × max |t| (a clear, local corruption)."""
    out = t.clone()
    out.view(-1)[out.numel() // 2] += relative * float(t.abs().max())
    return out


def expect_failure(layer: LayerRun, block: str) -> str:
    with pytest.raises(SelfCheckError) as caught:
        check_layer(layer)
    message = str(caught.value)
    assert re.search(rf"\blayer {layer.index}\b", message), message
    assert block in message, message
    return message


def test_real_layers_pass(
    layer: LayerRun, parallel_layer: LayerRun, postnorm_layer: LayerRun
) -> None:
    for good in (layer, parallel_layer, postnorm_layer):
        check_layer(good)  # raises on failure


def test_a_failed_check_reaches_the_boundary_as_a_library_error(layer: LayerRun) -> None:
    """The CLI and the app catch ``LlmFlowError`` (one stderr line / ``st.error``): a broken
    identity must arrive there as one, saying which layer and block, not as a traceback."""
    bad = dataclasses.replace(layer, mlp_update=bumped(layer.mlp_update))
    try:
        check_layer(bad)
    except LlmFlowError as caught:  # what the boundaries catch, not the specific class
        error: LlmFlowError = caught
    else:
        pytest.fail("check_layer accepted a layer whose FFN update was corrupted")
    assert type(error) is SelfCheckError
    message = str(error)
    assert re.search(rf"\blayer {LAYER}\b", message), message
    assert "FFN: Σ per-neuron parts" in message, message


def test_corrupt_attention_update_fails_the_head_sum(layer: LayerRun) -> None:
    bad = dataclasses.replace(layer, attn_update=bumped(layer.attn_update))
    expect_failure(bad, "attention: Σ per-head parts")


def test_corrupt_W_O_fails_the_head_sum(layer: LayerRun) -> None:
    bad = dataclasses.replace(layer, W_O=bumped(layer.W_O, 0.5))
    expect_failure(bad, "attention: Σ per-head parts")


def test_corrupt_output_bias_fails_the_head_sum(layer: LayerRun) -> None:
    bad = dataclasses.replace(layer, b_O=torch.zeros_like(layer.b_O))  # a dropped bias
    expect_failure(bad, "attention: Σ per-head parts")


def test_unexpanded_gqa_values_fail_the_head_sum() -> None:
    """Expanding K/V heads with ``repeat`` instead of ``repeat_interleave`` is caught."""
    llama = tiny_llm("llama-gqa").run(prompt(7)).layers[LAYER]
    kv = llama.values[:, ::2]  # [T, n_kv_heads, d_head]: the KV heads
    assert torch.equal(llama.values, kv.repeat_interleave(2, dim=1))
    bad = dataclasses.replace(llama, values=kv.repeat(1, 2, 1))
    expect_failure(bad, "attention: Σ per-head parts")


def test_corrupt_mlp_update_fails_the_neuron_sum(layer: LayerRun) -> None:
    bad = dataclasses.replace(layer, mlp_update=bumped(layer.mlp_update))
    expect_failure(bad, "FFN: Σ per-neuron parts")


def test_corrupt_W_out_fails_the_neuron_sum(layer: LayerRun) -> None:
    bad = dataclasses.replace(layer, W_out=bumped(layer.W_out, 0.5))
    expect_failure(bad, "FFN: Σ per-neuron parts")


def test_corrupt_resid_mid_fails_the_attention_residual(layer: LayerRun) -> None:
    assert layer.resid_mid is not None
    bad = dataclasses.replace(layer, resid_mid=bumped(layer.resid_mid))
    expect_failure(bad, "attention: resid_pre + update ≠ resid_mid")


def test_corrupt_resid_post_fails_the_ffn_residual(layer: LayerRun) -> None:
    bad = dataclasses.replace(layer, resid_post=bumped(layer.resid_post))
    expect_failure(bad, "FFN: resid_mid + update ≠ resid_post")


def test_corrupt_resid_post_fails_the_parallel_block(parallel_layer: LayerRun) -> None:
    bad = dataclasses.replace(parallel_layer, resid_post=bumped(parallel_layer.resid_post))
    expect_failure(bad, "parallel block")


def test_wrong_post_norm_scale_fails(postnorm_layer: LayerRun) -> None:
    ones = torch.ones_like(postnorm_layer.attn_scale)
    expect_failure(dataclasses.replace(postnorm_layer, attn_scale=ones), "attention: Σ per-head")
    expect_failure(dataclasses.replace(postnorm_layer, mlp_scale=ones), "FFN: Σ per-neuron")


@pytest.mark.parametrize("field", ["resid_post", "attn_update", "mlp_update", "W_O", "pattern"])
def test_nan_fails(layer: LayerRun, field: str) -> None:
    tensor = getattr(layer, field).clone()
    tensor.view(-1)[0] = float("nan")
    with pytest.raises(SelfCheckError, match=rf"\blayer {LAYER}\b"):
        check_layer(dataclasses.replace(layer, **{field: tensor}))


def test_tolerance_is_relative_1e_4_in_float32(layer: LayerRun) -> None:
    assert RTOL[torch.float32] == 1e-4
    check_layer(dataclasses.replace(layer, resid_post=bumped(layer.resid_post, 1e-5)))
    with pytest.raises(SelfCheckError):
        check_layer(dataclasses.replace(layer, resid_post=bumped(layer.resid_post, 1e-3)))


def test_relative_error() -> None:
    whole = torch.tensor([100.0, -200.0])
    assert relative_error(whole, whole) == 0.0
    # Exact: |101 − 100| / 200 is one correctly rounded float64 division, as 1 / 200 is.
    assert relative_error(torch.tensor([101.0, -200.0]), whole) == 1 / 200
    assert not relative_error(torch.tensor([float("nan"), -200.0]), whole) <= RTOL[torch.float32]


def test_checked_rows_spread_over_a_long_prompt() -> None:
    assert checked_rows(CHECKED_ROWS) is None  # every row of a short prompt
    for n in (CHECKED_ROWS + 1, 1000, 8191):
        rows = checked_rows(n)
        assert rows is not None
        assert len(rows) == CHECKED_ROWS
        assert rows[0] == 0 and rows[-1] == n - 1
        assert bool((rows.diff() > 0).all())
        # no stretch of the prompt is left out: gaps are the even spacing, rounded
        assert int(rows.diff().max()) <= -(-(n - 1) // (CHECKED_ROWS - 1))


def test_a_long_prompt_checks_the_products_at_spread_rows() -> None:
    """Past ``most_rows`` tokens the products are redone at spread rows: a wrong weight or a
    corrupted checked row fails there, and a row left out still meets the residual identity,
    which is checked at every row."""
    long = tiny_llm("gpt2-bias").run(prompt(40)).layers[LAYER]
    rows = checked_rows(long.resid_pre.shape[0], 8)
    assert rows is not None
    check_layer(long, most_rows=8)
    bad_w = dataclasses.replace(long, W_O=bumped(long.W_O, 0.5))
    with pytest.raises(SelfCheckError, match="attention: Σ per-head parts"):
        check_layer(bad_w, most_rows=8)
    with pytest.raises(SelfCheckError, match="FFN: Σ per-neuron parts"):
        check_layer(dataclasses.replace(long, W_out=bumped(long.W_out, 0.5)), most_rows=8)
    unchecked = next(t for t in range(long.resid_pre.shape[0]) if t not in rows.tolist())
    for row, block in ((int(rows[3]), "attention: Σ per-head"), (unchecked, "resid_pre + update")):
        update = long.attn_update.clone()
        update[row] += 1e-2 * float(update.abs().max())
        with pytest.raises(SelfCheckError, match=re.escape(block)):
            check_layer(dataclasses.replace(long, attn_update=update), most_rows=8)
