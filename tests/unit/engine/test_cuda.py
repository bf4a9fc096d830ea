"""The engine on a GPU gives the CPU's contributions (skipped on machines without CUDA).

With triton installed (the gpu extra) the engine's CUDA proximities are the Triton kernels, so
the graph checks below go through them too; scripts/gpu-check.sh runs this file on a GPU box.
"""

from __future__ import annotations

import pytest
import torch

from llm_flow.engine.contributions import attention_proximity, head_proximity, kernel_for
from llm_flow.engine.trace import trace
from llm_flow.models.bridge import BridgeLlm
from tests.kernel_cases import attention_inputs, head_bound, token_bound
from tests.tiny import ARCHS, prompt, tiny_hf_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_equals_cpu_graph(arch: str) -> None:
    text = prompt(20, seed=7)
    cpu = BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer())
    gpu = BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer(), device="cuda")
    g_cpu = trace(cpu, text).graph
    on_gpu = trace(gpu, text, keep_patterns=False)
    g_gpu = on_gpu.graph
    assert on_gpu.run.logits.device.type == "cuda"
    torch.testing.assert_close(g_gpu.attention, g_cpu.attention, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_gpu.ffn, g_cpu.ffn, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_passes_self_checks(dtype: torch.dtype) -> None:
    llm = BridgeLlm(
        "llama-gqa", tiny_hf_model("llama-gqa"), tiny_tokenizer(), device="cuda", dtype=dtype
    )
    graph = trace(llm, prompt(30)).graph
    total = graph.attention.sum(-1) + graph.attn_residual + graph.attn_bias
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_auto_kernel_on_cuda_is_the_compiled_triton_kernel() -> None:
    pytest.importorskip("triton")
    from llm_flow.engine import gpu_kernels

    assert kernel_for(torch.device("cuda")) == "triton"
    assert not gpu_kernels.interpreted(), "TRITON_INTERPRET=1 reached this process"


# Model-sized shapes (Llama-3.1-8B: 32 heads, D = 4096) and odd ones around the 16-row tiles.
KERNEL_SHAPES = [(300, 32, 4096), (77, 8, 200), (1, 4, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "n_heads", "d_model"), KERNEL_SHAPES)
def test_triton_token_kernel_equals_the_torch_path_on_cuda(
    n: int, n_heads: int, d_model: int, dtype: torch.dtype
) -> None:
    pytest.importorskip("triton")
    inputs = attention_inputs(n, n_heads, d_model, dtype=dtype, device="cuda", seed=n)
    kernel = attention_proximity(*inputs, backend="triton")
    reference = attention_proximity(*inputs, backend="torch")
    assert kernel.dtype == torch.float32 and kernel.device.type == "cuda"
    assert ((kernel.double() - reference.double()).abs() <= token_bound(inputs)).all()
    assert (kernel.triu(1) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "n_heads", "d_model"), KERNEL_SHAPES)
def test_triton_head_kernel_equals_the_torch_path_on_cuda(
    n: int, n_heads: int, d_model: int, dtype: torch.dtype
) -> None:
    pytest.importorskip("triton")
    inputs = attention_inputs(n, n_heads, d_model, dtype=dtype, device="cuda", seed=n + 1)
    rows = torch.tensor(sorted({n - 1, 0, n // 2, n // 3}, reverse=True), device="cuda")
    whole, pattern, u, scale = inputs
    at_rows = pattern[:, rows]  # [H, R, S]
    kernel = head_proximity(whole, at_rows, u, scale, rows, backend="triton")
    reference = head_proximity(whole, at_rows, u, scale, rows, backend="torch")
    assert ((kernel.double() - reference.double()).abs() <= head_bound(inputs, rows)).all()
