"""``llm-flow bench``: time the engine's stages and measure memory at several prompt lengths.

Per token count: ``forward_s`` (one forward pass capturing what the engine needs), ``graph_s``
(all contributions + the dense graph), ``routes_s`` (one threshold change: re-prune and walk the
route), ``peak_rss_mb`` (the process's peak resident memory so far) and ``graph_extra_mb`` (peak
resident memory while building the graph, above what the process held just before it: the
engine's own working memory beyond the model and the run); ``peak_cuda_mb`` (peak CUDA memory
allocated during the row, null on a CPU), the proximity ``kernel`` the engine used and the
``device`` it ran on.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm_flow.engine.contributions import kernel_for
from llm_flow.engine.graph import FlowGraph, contributions_of, sparse_layer
from llm_flow.engine.routes import find_route
from llm_flow.errors import InputError, LlmFlowError
from llm_flow.models.base import TransparentLlm

BENCH_TEXT = Path(__file__).resolve().parents[2] / "sample_inputs" / "bench_text.txt"
ROUTE_THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.1)


@dataclass(frozen=True)
class BenchRow:
    tokens: int
    forward_s: float
    graph_s: float
    routes_s: float
    graph_over_forward: float
    peak_rss_mb: float
    graph_extra_mb: float
    peak_cuda_mb: float | None
    kernel: str
    device: str

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


@contextmanager
def _peak_rss(result: list[float], interval_s: float = 0.002) -> Iterator[None]:
    """Sample resident memory in a thread; appends the peak (MB) to ``result`` on exit."""
    peak = [_rss_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        result.append(max(peak[0], _rss_mb()))


def prompt_of_length(llm: TransparentLlm, n_tokens: int, text_path: Path = BENCH_TEXT) -> str:
    """A prompt that tokenizes to about ``n_tokens`` tokens (BOS included), cut from the bench
    text."""
    if not text_path.exists():
        raise LlmFlowError(f"bench text {text_path} is missing; run from a source checkout")
    text = text_path.read_text(encoding="utf-8")
    body = n_tokens - (1 if llm.info.prepends_bos else 0)
    ids = llm.encode(text)
    while len(ids) < body:  # repeat the passage for very long prompts
        text = text + "\n\n" + text
        ids = llm.encode(text)
    return llm.decode(ids[:body])


def device_name(device: torch.device) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU's and its core count."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def parse_token_counts(text: str) -> list[int]:
    """``"64,256,1024"`` → token counts, each at least 2."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"token counts must be comma-separated integers, got '{text}'") from None
    if not counts or min(counts) < 2:
        raise InputError(f"token counts must be at least 2, got '{text}'")
    return counts


def bench(
    llm: TransparentLlm,
    token_counts: Sequence[int],
    *,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    rows = []
    device = torch.device(llm.info.device)
    cuda = device.type == "cuda"
    # Warm-up: kernels, the compiled contribution kernel's load from its cache, allocator pools.
    warm = llm.run("Warm up the kernels.")
    contributions_of(warm.layers[0])
    for n in token_counts:
        if progress is not None:
            progress(f"bench: {n} tokens")
        prompt = prompt_of_length(llm, n)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run = llm.run(prompt)
        forward_s = time.perf_counter() - start
        before = _rss_mb()
        peak: list[float] = []
        with _peak_rss(peak):
            start = time.perf_counter()
            layers = [sparse_layer(contributions_of(layer)) for layer in run.layers]
            graph = FlowGraph.from_layers(run, layers)
            graph_s = time.perf_counter() - start
        start = time.perf_counter()
        for threshold in ROUTE_THRESHOLDS:
            find_route(graph, [-1], threshold=threshold, renormalize=True)
        routes_s = (time.perf_counter() - start) / len(ROUTE_THRESHOLDS)
        rows.append(
            BenchRow(
                tokens=run.n_tokens,
                forward_s=round(forward_s, 4),
                graph_s=round(graph_s, 4),
                routes_s=round(routes_s, 5),
                graph_over_forward=round(graph_s / forward_s, 2),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                graph_extra_mb=round(peak[0] - before, 1),
                peak_cuda_mb=(
                    round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None
                ),
                kernel=kernel_for(device),
                device=device_name(device),
            )
        )
        del run, graph
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    header = (
        "tokens",
        "forward_s",
        "graph_s",
        "graph/fwd",
        "routes_ms",
        "peak_rss_mb",
        "graph_extra_mb",
        "peak_cuda_mb",
    )
    first = rows[0] if rows else None
    lines = [] if first is None else [f"{first.device}; proximity kernel: {first.kernel}"]
    lines.append("  ".join(f"{h:>12}" for h in header))
    for r in rows:
        cells = (
            r.tokens,
            f"{r.forward_s:.3f}",
            f"{r.graph_s:.3f}",
            f"{r.graph_over_forward:.2f}",
            f"{r.routes_s * 1000:.2f}",
            f"{r.peak_rss_mb:.0f}",
            f"{r.graph_extra_mb:.0f}",
            "-" if r.peak_cuda_mb is None else f"{r.peak_cuda_mb:.0f}",
        )
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)
