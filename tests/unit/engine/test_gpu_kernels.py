"""The Triton kernels (llm_flow/engine/gpu_kernels.py) give the torch path's proximities.

Triton picks compiled or interpreted kernels once per process, when it is first imported
(``TRITON_INTERPRET=1``, triton's own standard library included), so this process never sets it:
the kernel cases run here on CUDA when there is a GPU, and ``test_kernels_in_the_interpreter``
runs this same file in a child pytest with ``TRITON_INTERPRET=1``, where they run on CPU
tensors. No other test ever sees the interpreter (test_cuda.py checks its kernels are compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from llm_flow.engine import gpu_kernels  # noqa: E402  (after the skip: it imports triton)
from llm_flow.engine.contributions import (  # noqa: E402
    attention_proximity,
    head_contributions,
    head_proximity,
    kernel_for,
)
from llm_flow.errors import DeviceError, KernelError  # noqa: E402
from tests.kernel_cases import (  # noqa: E402
    attention_inputs,
    head_bound,
    overshoots,
    token_bound,
)

INTERPRETED = gpu_kernels.interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
REPO = Path(__file__).resolve().parents[3]

runs_kernels = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="no CUDA: test_kernels_in_the_interpreter runs these on the CPU",
)

# (T, H, D): T around the 16-row tiles (one, exactly one, one more, three with a tail, so tiles
# above the diagonal are skipped), D not a power of two, below and across the 32-wide D blocks.
SHAPES = [(1, 1, 8), (16, 2, 40), (17, 3, 24), (40, 4, 40)]
DTYPES = [torch.float32, torch.bfloat16]


def test_kernels_in_the_interpreter() -> None:
    if INTERPRETED:
        pytest.skip("this is the interpreter's process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout and " failed" not in child.stdout, child.stdout[-3000:]


def test_auto_picks_triton_on_cuda_for_float32_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert kernel_for(cuda) == "triton"
    assert kernel_for(cuda, torch.float64) == "torch"
    assert kernel_for(torch.device("cpu")) == "numba"
    # Below Triton's minimum GPU (e.g. a Pascal card, 6.1): the torch path.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert kernel_for(cuda) == "torch"


def test_a_kernel_that_does_not_fit_the_gpu_is_a_kernel_error_in_words() -> None:
    """What Triton raises when a kernel does not compile (here: its shared memory) arrives as
    a :class:`KernelError` naming the kernel and the reason, not as Triton's traceback."""
    from triton.runtime.errors import OutOfResources

    class Unfit:
        __name__ = "_unfit_kernel"

        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **meta: object) -> None:
                raise OutOfResources(331776, 232448, "shared memory")

            return launch

    with pytest.raises(KernelError, match=r"_unfit_kernel does not run on this GPU .*shared"):
        gpu_kernels._launch(Unfit(), (1, 1))


def test_auto_falls_back_to_torch_once_triton_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under "auto" a kernel that does not run on this GPU is said once (a warning) and the
    torch path takes over for the rest of the process; asked for by name, it is an error."""
    from llm_flow.engine import contributions

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(contributions, "_TRITON_FAILED", [])
    assert kernel_for(cuda) == "triton"

    def unfit() -> torch.Tensor:
        raise KernelError("the Triton kernel _k does not run on this GPU (shared memory)")

    with pytest.raises(KernelError):
        contributions._on_triton(unfit, asked=True)
    assert kernel_for(cuda) == "triton"  # an explicit request changes nothing for "auto"
    with caplog.at_level("WARNING"):
        assert contributions._on_triton(unfit, asked=False) is None
    assert "does not run on this GPU" in caplog.text and "torch path" in caplog.text
    assert kernel_for(cuda) == "torch"


def test_compiled_kernels_refuse_cpu_tensors_in_words() -> None:
    if INTERPRETED:
        pytest.skip("the interpreter takes CPU tensors")
    inputs = attention_inputs(4, 1, 8)
    with pytest.raises(DeviceError, match="CUDA tensors"):
        attention_proximity(*inputs, backend="triton")


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "n_heads", "d_model"), SHAPES)
def test_token_kernel_equals_the_torch_path(
    n: int, n_heads: int, d_model: int, dtype: torch.dtype
) -> None:
    inputs = attention_inputs(n, n_heads, d_model, dtype=dtype, device=DEVICE, seed=n)
    assert n == 1 or overshoots(inputs)
    kernel = attention_proximity(*inputs, backend="triton")
    reference = attention_proximity(*inputs, backend="torch")  # upcasts to float32 too
    assert kernel.dtype == torch.float32 and kernel.shape == (n, n)
    assert ((kernel.double() - reference.double()).abs() <= token_bound(inputs)).all()
    assert (kernel.triu(1) == 0).all()


def test_token_tiles_take_fewer_sources_past_64_heads() -> None:
    """Four sources a tile (the fastest on an H200) while a tile's head outputs fit the shared
    memory budget; heads pad to a power of two of at least 16 for the tensor cores."""
    assert [gpu_kernels.heads_block(h) for h in (1, 9, 16, 17, 32, 65)] == [16, 16, 16, 32, 32, 128]
    assert gpu_kernels.token_tiles(9) == gpu_kernels.token_tiles(64) == (16, 4, 32, 4)
    assert gpu_kernels.token_tiles(128)[1] == 2
    assert gpu_kernels.token_tiles(256)[1] == 1


@runs_kernels
@pytest.mark.parametrize(("n", "n_heads", "d_model"), [(24, 33, 24), (21, 65, 16)])
def test_token_kernel_with_many_heads_equals_the_torch_path(
    n: int, n_heads: int, d_model: int
) -> None:
    """Heads padded past a power of two, and tiles of 4 and 2 sources."""
    inputs = attention_inputs(n, n_heads, d_model, device=DEVICE, seed=n)
    kernel = attention_proximity(*inputs, backend="triton")
    reference = attention_proximity(*inputs, backend="torch")
    assert ((kernel.double() - reference.double()).abs() <= token_bound(inputs)).all()


@runs_kernels
def test_token_kernel_is_causal_whatever_the_pattern() -> None:
    """A pattern that attends to the future: sources s > t still get no part."""
    inputs = attention_inputs(20, 2, 24, device=DEVICE, causal=False)
    kernel = attention_proximity(*inputs, backend="triton")
    reference = attention_proximity(*inputs, backend="torch").tril()
    assert (kernel.triu(1) == 0).all()
    assert ((kernel.double() - reference.double()).abs() <= token_bound(inputs)).all()


@runs_kernels
def test_half_precision_inputs_accumulate_in_float32() -> None:
    inputs = attention_inputs(17, 2, 40, dtype=torch.float16, device=DEVICE)
    kernel = attention_proximity(*inputs, backend="triton")
    reference = attention_proximity(*inputs, backend="torch")
    assert ((kernel.double() - reference.double()).abs() <= token_bound(inputs)).all()


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n", "n_heads", "d_model", "rows"),
    [
        (1, 1, 8, [0]),
        (17, 2, 40, list(range(17))),
        (40, 3, 40, [39, 0, 17, 17, 5]),  # any order, repeats, 5 rows in one 16-row block
        (40, 4, 24, [3, 20]),  # sources 16-39 lie after both rows: skipped tiles
    ],
)
def test_head_kernel_equals_the_torch_path(
    n: int, n_heads: int, d_model: int, rows: list[int], dtype: torch.dtype
) -> None:
    inputs = attention_inputs(n, n_heads, d_model, dtype=dtype, device=DEVICE, seed=n + 1)
    idx = torch.tensor(rows, device=DEVICE)
    whole, pattern, u, scale = inputs
    at_rows = pattern[:, idx]  # [H, R, S]: the attention at the rows, as views pass it
    kernel = head_proximity(whole, at_rows, u, scale, idx, backend="triton")
    reference = head_proximity(whole, at_rows, u, scale, idx, backend="torch")
    assert kernel.dtype == torch.float32 and kernel.shape == (len(rows), n, n_heads)
    assert ((kernel.double() - reference.double()).abs() <= head_bound(inputs, idx)).all()
    for i, t in enumerate(rows):
        assert (kernel[i, t + 1 :] == 0).all()


@runs_kernels
def test_head_contributions_pass_the_backend_through() -> None:
    whole, pattern, u, scale = attention_inputs(17, 3, 24, device=DEVICE)
    rows = torch.tensor([16, 2], device=DEVICE)
    kwargs = {
        "resid_pre": whole * 0.5,
        "resid_mid": whole,
        "resid_post": whole * 1.1,
        "mlp_update": whole * 0.1,
        "head_outputs": u,
        "attn_scale": scale,
        "attn_bias": torch.full_like(whole[0], 0.01),
        "rows": rows,
        "pattern": pattern[:, rows],  # [H, R, S]
    }
    heads, residual = head_contributions(**kwargs, backend="triton")
    ref_heads, ref_residual = head_contributions(**kwargs, backend="torch")
    # Shares ≤ 1 from proximities summed over D terms in two orders: about D eps.
    tol = 2 * 24 * torch.finfo(torch.float32).eps
    # (Plain comparisons: torch.testing's first call costs seconds.)
    assert float((heads - ref_heads).abs().max()) <= tol
    assert float((residual - ref_residual).abs().max()) <= tol
