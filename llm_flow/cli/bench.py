"""``llm-flow bench``: time the engine's stages and measure memory at several prompt lengths.

Per token count, a forward pass builds the graph as the engine does (each layer's
contributions computed as soon as the layer has run, no attention pattern kept), twice, and the
faster pass is timed (the first at a new length also takes its memory from the OS): ``graph_s``
is the time spent in those contributions and the (sparse) graph, ``forward_s`` the rest of the
pass (the model plus capturing what the engine needs); ``routes_s`` is one threshold change
(re-prune and walk the route), ``peak_rss_mb`` the process's peak resident memory so far and
``graph_extra_mb`` the peak resident memory during the first pass above what the process held
just before it (activations, the engine's working memory and the graph, beyond the model);
``peak_cuda_mb`` the peak CUDA memory allocated during the row (null on a CPU); ``hf_forward_s``
is the honest baseline: the model's own transformers forward over the same tokens, with no hook,
capture or check and its fastest attention implementation (``baseline`` says which; the faster of
two), and ``end_to_end`` = (forward_s + graph_s) / hf_forward_s, what a graph costs in plain
forward passes; ``first_pass_s`` is forward_s + graph_s of the first of the two passes, what a
user waits for when a process first meets a prompt of this length; with ``heads``, ``heads_s`` is
the per-head contributions of every query of the middle layer (what the app's head map computes).
The graph keeps the attention edges a trace of those tokens keeps (every causal edge while they
fit its budget). ``kernel`` and ``device`` say what the numbers were measured with.
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

from llm_flow import resources
from llm_flow.engine.contributions import kernel_for
from llm_flow.engine.graph import (
    FlowGraph,
    SparseLayer,
    contributions_of,
    layer_head_contributions,
    sparse_layer,
)
from llm_flow.engine.routes import find_route
from llm_flow.engine.trace import attention_floor_for
from llm_flow.errors import InputError, LlmFlowError
from llm_flow.models.base import LayerRun, TransparentLlm

BENCH_TEXT = resources.sample_inputs_dir() / "bench_text.txt"
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
    hf_forward_s: float
    end_to_end: float
    baseline: str
    first_pass_s: float
    heads_s: float | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _max_rss_mb() -> float:
    """The process's peak resident memory (MB): Linux's high-water mark (VmHWM, since the last
    :func:`_reset_max_rss`), elsewhere getrusage's. Not getrusage on Linux: it also reports the
    parent's resident size when the process was forked, which no reset lowers."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024  # bytes there, else kB


def _reset_max_rss() -> bool:
    """Reset Linux's resident high-water mark (False where there is none to reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def _peak_rss(result: list[float], peaks: list[float], interval_s: float = 0.002) -> Iterator[None]:
    """Append the peak resident memory (MB) during the block to ``result``; ``peaks`` gets
    every peak the process reached, the one before the block included (its overall peak).

    Linux's high-water mark, reset at the start: exact, and no thread competes with the pass
    for the CPU (a thread sampling every 2 ms, used elsewhere, cost 0.1-0.15 s of a 1024-token
    SmolLM2 pass on the 2-core CPU, measured)."""
    peaks.append(_max_rss_mb())
    if _reset_max_rss():
        yield
        result.append(_max_rss_mb())
        peaks.append(result[-1])
        return
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
    return f"CPU {_cpu_model()} ({os.cpu_count()} cores)"


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name where Linux says it (platform.processor() is empty there), with its
    architecture; else what platform knows."""
    arch = platform.machine()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return f"{value.strip()}, {arch}"
    return platform.processor() or arch


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
    heads: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    device = torch.device(llm.info.device)
    # Warm-up: kernels, the compiled contribution kernels' load from their cache, allocators.
    warm = llm.run("Warm up the kernels.")
    contributions_of(warm.layers[0])
    layer_head_contributions(warm.layers[0], torch.arange(warm.n_tokens, device=device))
    llm.plain_logits(warm.token_ids)
    rows = []
    peaks: list[float] = []  # the process's, before and during each pass (see _peak_rss)
    for n in token_counts:
        if progress is not None:
            progress(f"bench: {n} tokens")
        rows.append(_bench_row(llm, prompt_of_length(llm, n), device, heads, peaks))
    return rows


@dataclass(frozen=True)
class _Pass:
    """One pass building a graph as the engine does: its times, and its memory (see bench)."""

    forward_s: float
    graph_s: float
    heads_s: float
    graph_extra_mb: float


def _graph_pass(
    llm: TransparentLlm,
    token_ids: Sequence[int],
    device: torch.device,
    heads: bool,
    peaks: list[float],
) -> tuple[_Pass, FlowGraph]:
    middle = llm.info.n_layers // 2
    floor = attention_floor_for(llm, len(token_ids))  # the graph a trace of them stores
    done: list[SparseLayer] = []
    spent = {"graph": 0.0, "heads": 0.0}

    def reduce(layer: LayerRun) -> None:
        start = time.perf_counter()
        done.append(sparse_layer(contributions_of(layer), floor))
        _sync(device)
        spent["graph"] += time.perf_counter() - start
        if heads and layer.index == middle:
            start = time.perf_counter()
            layer_head_contributions(layer, torch.arange(layer.resid_pre.shape[0], device=device))
            _sync(device)
            spent["heads"] = time.perf_counter() - start

    before = _rss_mb()
    peak: list[float] = []
    with _peak_rss(peak, peaks):
        start = time.perf_counter()
        run = llm.run(token_ids, on_layer=reduce, keep_patterns=False)
        graph_start = time.perf_counter()
        graph = FlowGraph.from_layers(run, done)
        end = time.perf_counter()
    graph_s = spent["graph"] + (end - graph_start)
    measured = _Pass(
        forward_s=end - start - graph_s - spent["heads"],
        graph_s=graph_s,
        heads_s=spent["heads"],
        graph_extra_mb=peak[0] - before,
    )
    return measured, graph


def _hf_forward_s(llm: TransparentLlm, token_ids: Sequence[int], device: torch.device) -> float:
    start = time.perf_counter()
    llm.plain_logits(token_ids)
    _sync(device)
    return time.perf_counter() - start


def _bench_row(
    llm: TransparentLlm, prompt: str, device: torch.device, heads: bool, peaks: list[float]
) -> BenchRow:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # Two passes each, the faster one timed: a process's first pass at a new length also pays
    # for taking its memory from the OS (page faults on ~1 GB at 1024 tokens: 0.9-1.3 s of
    # forward_s on the 2-core CPU, measured), which the baseline, run after it, never did.
    # Memory is the first pass's: what a graph needs beyond what the process held before.
    token_ids = llm.tokenize(prompt)
    # The first pass's graph is dropped before the second runs: held, it would raise the
    # process's peak memory (peak_rss_mb) above what one graph needs.
    first, _ = _graph_pass(llm, token_ids, device, heads, peaks)
    second, graph = _graph_pass(llm, token_ids, device, heads, peaks)
    timed = min(first, second, key=lambda p: p.forward_s + p.graph_s)
    hf_forward_s = min(_hf_forward_s(llm, token_ids, device) for _ in range(2))
    start = time.perf_counter()
    for threshold in ROUTE_THRESHOLDS:
        find_route(graph, [-1], threshold=threshold, renormalize=True)
    routes_s = (time.perf_counter() - start) / len(ROUTE_THRESHOLDS)
    return BenchRow(
        tokens=len(token_ids),
        forward_s=round(timed.forward_s, 4),
        graph_s=round(timed.graph_s, 4),
        routes_s=round(routes_s, 5),
        graph_over_forward=round(timed.graph_s / timed.forward_s, 2),
        peak_rss_mb=round(max(peaks + [_max_rss_mb()]), 1),
        graph_extra_mb=round(first.graph_extra_mb, 1),
        peak_cuda_mb=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        kernel=kernel_for(device),
        device=device_name(device),
        hf_forward_s=round(hf_forward_s, 4),
        end_to_end=round((timed.forward_s + timed.graph_s) / hf_forward_s, 2),
        baseline=llm.plain_attention,
        first_pass_s=round(first.forward_s + first.graph_s, 4),
        heads_s=round(timed.heads_s, 4) if heads else None,
    )


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a stage's time is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(rows: Sequence[BenchRow]) -> str:
    header = (
        "tokens",
        "forward_s",
        "graph_s",
        "graph/fwd",
        "hf_fwd_s",
        "e2e/hf",
        "first_s",
        "routes_ms",
        "peak_rss_mb",
        "graph_extra_mb",
        "peak_cuda_mb",
        "heads_s",
    )
    first = rows[0] if rows else None
    lines = (
        []
        if first is None
        else [f"{first.device}; proximity kernel: {first.kernel}; baseline: {first.baseline}"]
    )
    lines.append("  ".join(f"{h:>12}" for h in header))
    for r in rows:
        cells = (
            r.tokens,
            f"{r.forward_s:.3f}",
            f"{r.graph_s:.3f}",
            f"{r.graph_over_forward:.2f}",
            f"{r.hf_forward_s:.3f}",
            f"{r.end_to_end:.2f}",
            f"{r.first_pass_s:.3f}",
            f"{r.routes_s * 1000:.2f}",
            f"{r.peak_rss_mb:.0f}",
            f"{r.graph_extra_mb:.0f}",
            "-" if r.peak_cuda_mb is None else f"{r.peak_cuda_mb:.0f}",
            "-" if r.heads_s is None else f"{r.heads_s:.3f}",
        )
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)
