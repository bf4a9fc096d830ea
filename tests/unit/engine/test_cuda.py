"""The engine on a GPU gives the CPU's contributions (skipped on machines without CUDA)."""

from __future__ import annotations

import pytest
import torch

from llm_flow.engine.trace import trace
from llm_flow.models.bridge import BridgeLlm
from tests.tiny import ARCHS, prompt, tiny_hf_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_equals_cpu_graph(arch: str) -> None:
    text = prompt(20, seed=7)
    cpu = BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer())
    gpu = BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer(), device="cuda")
    g_cpu = trace(cpu, text, attention_floor=0.0).graph  # every edge: none near a floor
    on_gpu = trace(gpu, text, keep_patterns=False, attention_floor=0.0)
    g_gpu = on_gpu.graph
    assert on_gpu.run.logits.device.type == "cuda"
    torch.testing.assert_close(g_gpu.attn_weights, g_cpu.attn_weights, atol=1e-5, rtol=0)
    sparse = trace(gpu, text).graph  # sparsified on the GPU, stored on the CPU
    kept = g_gpu.dense_attention() >= sparse.attention_floor + 1e-5
    assert (sparse.dense_attention()[kept] > 0).all() and sparse.attn_weights.device.type == "cpu"
    torch.testing.assert_close(g_gpu.ffn, g_cpu.ffn, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_passes_self_checks(dtype: torch.dtype) -> None:
    llm = BridgeLlm(
        "llama-gqa", tiny_hf_model("llama-gqa"), tiny_tokenizer(), device="cuda", dtype=dtype
    )
    graph = trace(llm, prompt(30)).graph
    kept = graph.dense_attention().sum(-1)
    total = kept + graph.attn_dropped + graph.attn_residual + graph.attn_bias
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
