"""BridgeLlm in half precision and shared by threads: runs pass their self-checks and match the
float32 / single-thread runs within the rounding of their dtype."""

from __future__ import annotations

import pytest
import torch

from llm_flow.models.bridge import BridgeLlm
from tests.conftest import f32_tol
from tests.tiny import ARCHS, prompt, tiny_hf_model, tiny_llm, tiny_tokenizer
from tests.unit.models.test_bridge import PROMPT, RTOL, rel_err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_run_passes_its_self_checks(arch: str, dtype: torch.dtype) -> None:
    llm = BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer(), dtype=dtype)
    assert llm.info.dtype == str(dtype).removeprefix("torch.")
    run = llm.run(PROMPT)  # raises SelfCheckError if an identity fails
    assert all(layer.resid_post.dtype == dtype for layer in run.layers)
    assert all(layer.W_O.dtype == dtype for layer in run.layers)
    assert run.logits.dtype == torch.float32
    ref = tiny_hf_model(arch)
    with torch.no_grad():
        expected = ref(torch.tensor([run.token_ids])).logits[0]
    # Against float32: the residual stream is rounded to ``dtype`` at each of the 6 block
    # writes and once more at the unembedding, ≤ eps(dtype) each relative to the largest logit.
    assert rel_err(run.logits, expected) <= f32_tol(terms=2 * 3 + 1, dtype=dtype)


def test_concurrent_runs_on_one_model_do_not_mix() -> None:
    """App sessions share a model: runs from several threads equal the same runs done alone."""
    from concurrent.futures import ThreadPoolExecutor

    llm = tiny_llm("llama-gqa")
    prompts = [prompt(6 + i, seed=i) for i in range(8)]
    alone = [llm.run(p).logits for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda p: llm.run(p).logits, prompts))
    # The same pass, at most summed in another order; runs that mixed would be off by O(1).
    for a, b in zip(alone, together, strict=True):
        assert rel_err(b, a) <= RTOL
