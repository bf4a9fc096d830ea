"""The engine on a GPU gives the CPU's contributions, and a model split over two GPUs gives the
single GPU's (skipped on machines without CUDA, or with one GPU).

With triton installed (the gpu extra) the engine's CUDA proximities are the Triton kernels, so
the graph checks below go through them too; scripts/gpu-check.sh runs this file on a GPU box.
"""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch

import llm_flow as lf
from llm_flow.engine.contributions import attention_proximity, head_proximity, kernel_for
from llm_flow.engine.trace import trace
from llm_flow.models.bridge import BridgeLlm
from tests.kernel_cases import attention_inputs, head_bound, token_bound
from tests.tiny import ARCHS, layer_split_map, prompt, tiny_hf_model, tiny_tokenizer

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


def _split(arch: str) -> BridgeLlm:
    """``arch`` with its first half of layers (and the embeddings, final norm and unembedding)
    on cuda:0 and the rest on cuda:1, dispatched by accelerate."""
    from accelerate import dispatch_model

    model = tiny_hf_model(arch)
    model = dispatch_model(model, device_map=layer_split_map(model, [0, 1]))
    return BridgeLlm(arch, model, tiny_tokenizer())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_split_over_two_gpus_gives_the_single_gpu_graph(arch: str) -> None:
    text = prompt(20, seed=7)
    one = trace(BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer(), device="cuda:0"), text)
    split = _split(arch)
    assert split.info.weight_devices == ("cuda:0", "cuda:1")
    assert split.info.device == "cuda:0"
    two = trace(split, text)
    assert {layer.values.device for layer in two.run.layers} == {torch.device("cuda:0")}
    assert any(layer.W_O.device == torch.device("cuda:1") for layer in two.run.layers)
    torch.testing.assert_close(two.run.logits, one.run.logits, atol=1e-5, rtol=0)
    dense = two.graph.dense_attention(), one.graph.dense_attention()
    torch.testing.assert_close(*dense, atol=1e-5, rtol=0)
    for field in ("attn_residual", "attn_bias", "ffn"):
        torch.testing.assert_close(
            getattr(two.graph, field), getattr(one.graph, field), atol=1e-5, rtol=0
        )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-moe"])
def test_analyses_of_a_split_model_match_the_single_gpu_ones(arch: str) -> None:
    """Direct effects, attributions, the logit lens and ablations multiply activations (on
    cuda:0) by weights of layers on cuda:1."""
    text = prompt(12, seed=5)
    single = lf.from_hf(tiny_hf_model(arch).to("cuda:0"), tiny_tokenizer(), name=arch)
    results = []
    for llm in (single, _split(arch)):
        tr = lf.trace(llm, text)
        analysis = tr.contrast("w3", "w7")
        ablated = lf.ablate(tr, heads="2.1", target="w3", distractor="w7")
        lens = tr.lens(f"A2_{tr.n_tokens - 1}", k=3)
        results.append((analysis, ablated, lens))
    (a1, b1, l1), (a2, b2, l2) = results
    assert a2.contrast.logit_diff == pytest.approx(a1.contrast.logit_diff, abs=1e-4)
    torch.testing.assert_close(a2.direct.heads, a1.direct.heads, atol=1e-4, rtol=0)
    torch.testing.assert_close(a2.direct.neurons, a1.direct.neurons, atol=1e-4, rtol=0)
    torch.testing.assert_close(a2.direct.experts, a1.direct.experts, atol=1e-4, rtol=0)
    assert [astuple(row)[:7] for row in a2.rows] == [astuple(row)[:7] for row in a1.rows]
    got, want = ([row.attribution for row in a.rows] for a in (a2, a1))
    assert got == pytest.approx(want, abs=1e-4)
    assert b2.after.logit_diff == pytest.approx(b1.after.logit_diff, abs=1e-4)
    assert [t.token_id for t in l2] == [t.token_id for t in l1]
