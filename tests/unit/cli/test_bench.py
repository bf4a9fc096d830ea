"""Tests for ``llm-flow bench``: its rows (JSON and table) on a tiny local model. Times are
reported, never asserted."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from tests.cli_runner import run_cli as cli
from tests.conftest import SavedTiny


@pytest.fixture(scope="module")
def config_file(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"models": {"tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))}}}
    path = tmp_path_factory.mktemp("bench") / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_bench_json_rows(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    code, out, err = cli(
        capsys, "bench", "--config", str(config_file), "--tokens", "8,16", "--json"
    )
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert isinstance(rows, list) and len(rows) == 2
    for row, requested in zip(rows, (8, 16), strict=True):
        for field in ("forward_s", "graph_s", "routes_s", "peak_rss_mb"):
            assert isinstance(row[field], int | float) and row[field] >= 0, field
        assert row["peak_rss_mb"] > 0
        assert abs(row["tokens"] - requested) <= 1
        # On a CPU in float32: the fused CPU kernel, no CUDA memory, the CPU and its cores named.
        assert row["kernel"] == "numba" and row["peak_cuda_mb"] is None
        assert row["device"].startswith("CPU ") and "cores" in row["device"]
        assert row["heads_s"] is None  # only with --heads
        # The baseline: the unhooked transformers model, and the graph's cost in its passes.
        assert row["baseline"] == "transformers, sdpa attention" and row["hf_forward_s"] > 0
        # From the rounded times (to 1e-4 s each), then rounded to 0.01 itself.
        work, base = row["forward_s"] + row["graph_s"], row["hf_forward_s"]
        low, high = (work - 1e-4) / (base + 5e-5), (work + 1e-4) / max(base - 5e-5, 1e-9)
        assert low - 0.005 <= row["end_to_end"] <= high + 0.005
        # The first pass is the slower of the two (the other one is timed), to the rounding.
        assert row["first_pass_s"] >= work - 2e-4


def test_bench_times_the_per_head_map_with_heads(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, err = cli(
        capsys, "bench", "--config", str(config_file), "--tokens", "8", "--heads", "--json"
    )
    assert (code, err) == (0, "")
    (row,) = json.loads(out)
    assert isinstance(row["heads_s"], float) and row["heads_s"] > 0


def test_bench_table(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    code, out, err = cli(capsys, "bench", "--config", str(config_file), "--tokens", "4")
    assert (code, err) == (0, "")
    lines = out.strip().splitlines()
    assert "tiny" in lines[0]
    assert lines[1].startswith("CPU ") and "proximity kernel: numba;" in lines[1]
    assert lines[1].endswith("baseline: transformers, sdpa attention")
    assert "forward_s" in lines[2] and "hf_fwd_s" in lines[2] and "e2e/hf" in lines[2]
    assert "first_s" in lines[2]
    assert lines[3].split()[0] == "4" and lines[3].split()[-1] == "-"


def test_the_cpu_is_named_by_its_model(tmp_path: Path) -> None:
    from llm_flow.cli.bench import _cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t: fpu\n")
    assert _cpu_model(cpuinfo) == f"Example CPU 9000, {platform.machine()}"
    assert _cpu_model(tmp_path / "absent") == (platform.processor() or platform.machine())


def test_bench_builds_the_graph_a_trace_would() -> None:
    """bench sparsifies at the floor a trace of the same tokens uses (every causal edge while
    they fit the trace's budget, as 12 tokens do), so it times the graph the app and the CLI
    build."""
    import torch

    from llm_flow.cli import bench
    from llm_flow.engine.trace import attention_floor_for
    from tests.tiny import prompt, tiny_llm

    llm = tiny_llm("llama-gqa")
    token_ids = llm.tokenize(prompt(12))
    _, graph = bench._graph_pass(llm, token_ids, torch.device("cpu"), heads=False, peaks=[])
    n = len(token_ids)
    assert graph.attention_floor == attention_floor_for(llm, n) == 0.0
    assert len(graph.attn_weights) == llm.info.n_layers * n * (n + 1) // 2  # every causal edge


def test_bench_times_the_faster_pass_and_reports_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row runs two passes: the faster is timed, the first (slower when a process first
    meets a length) is reported as ``first_pass_s``, and memory is the first's."""
    from dataclasses import replace

    import torch

    from llm_flow.cli import bench
    from tests.tiny import prompt, tiny_llm

    real = bench._graph_pass
    passes = iter([(3.0, 2.0, 700.0), (1.0, 1.5, 300.0)])  # (forward_s, graph_s, extra MB)

    def fixed(*args: object, **kwargs: object) -> tuple[object, object]:
        measured, graph = real(*args, **kwargs)  # type: ignore[arg-type]
        forward_s, graph_s, extra = next(passes)
        return replace(measured, forward_s=forward_s, graph_s=graph_s, graph_extra_mb=extra), graph

    monkeypatch.setattr(bench, "_graph_pass", fixed)
    row = bench._bench_row(
        tiny_llm("llama-gqa"), prompt(8), torch.device("cpu"), heads=False, peaks=[]
    )
    assert (row.forward_s, row.graph_s, row.first_pass_s) == (1.0, 1.5, 5.0)
    assert row.graph_extra_mb == 700.0


# Run in a fresh process: a long test process's heap holds freed memory that a new buffer may
# reuse without raising the resident size at all (measured in CI: +0 MB for 300 MB).
_PEAK_SCRIPT = """
import json, sys, time
import numpy as np
from llm_flow.cli import bench

if sys.argv[1] == "sampler":  # systems without a resettable mark sample in a thread
    bench._reset_max_rss = lambda: False
block_mb, earlier_mb = {block_mb}, {earlier_mb}
earlier = np.ones(earlier_mb * 2**20 // 8)  # touched, then freed: the process's earlier peak
del earlier
before = bench._rss_mb()
result, peaks = [], []
with bench._peak_rss(result, peaks):
    block = np.ones(block_mb * 2**20 // 8)
    time.sleep(0.05)  # a sampler's interval is 2 ms
    del block
print(json.dumps({{"before": before, "block": result[0], "overall": max(peaks)}}))
"""


@pytest.mark.parametrize("how", ["high-water mark", "sampler"])
def test_peak_memory_of_a_block_and_of_the_process(how: str) -> None:
    """The peak inside a block counts a buffer allocated and freed there; the process's peak
    keeps what it reached before the block (the mark is reset at the block's start)."""
    import subprocess
    import sys

    block_mb, earlier_mb = 200, 300
    script = _PEAK_SCRIPT.format(block_mb=block_mb, earlier_mb=earlier_mb)
    done = subprocess.run(
        [sys.executable, "-c", script, how], capture_output=True, text=True, check=True
    )
    got = json.loads(done.stdout)
    # Pages of other allocations may come and go meanwhile: a quarter of a buffer is the margin.
    growth = got["block"] - got["before"]
    assert block_mb * 0.75 <= growth <= (block_mb + earlier_mb) / 2  # not the earlier peak
    assert got["overall"] >= got["before"] + earlier_mb * 0.75
