"""``llm-flow bench --dataset``: dataset mode's throughput in-process and as Ray jobs.

The prompts are the shipped ``ioi.txt`` and ``factual.txt`` (45 prompts of 10–20 tokens). Each
row times one run of dataset mode over all of them at τ = 0.04, after every model is loaded and
has run one prompt (numba's kernels, allocators): ``startup_s`` is that loading (and, for Ray,
starting the local cluster and the actors), ``seconds`` the run itself, ``prompts_per_s`` their
ratio. ``same_table`` says whether the run's table equals the in-process one: every count
exactly, the mean weights to float32 rounding (:data:`WEIGHT_RTOL`). Ray rows use 1 and 2
workers; on a CPU cluster the workers share its cores (2 workers on 2 cores: one torch and
numba thread each, against two for the in-process run), and sums over another number of threads
round differently in the last bits. With as many threads, the table is the same bit for bit
(tests/unit/test_distributed.py).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from llm_flow import resources
from llm_flow.analyses.dataset import dataset_frequencies
from llm_flow.cli.common import config_arg, model_spec, stderr_progress, write_out
from llm_flow.distributed import ModelRecipe, RayOptions, worker_pool
from llm_flow.engine.routes import DEFAULT_THRESHOLD
from llm_flow.io.prompts import read_prompt_file
from llm_flow.models import load_model

PROMPT_FILES = ("ioi.txt", "factual.txt")
# Mean weights are float32 sums over a few hundred parts: another thread count changes the
# summation order, a relative change of at most ~n·2⁻²⁴.
WEIGHT_RTOL = 1e-5
RAY_WORKERS = (1, 2)


@dataclass(frozen=True)
class DatasetBenchRow:
    mode: str  # "in-process" or "ray"
    workers: int
    prompts: int
    startup_s: float
    seconds: float
    prompts_per_s: float
    same_table: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def bench_prompts() -> list[str]:
    """The shipped prompts the dataset bench runs."""
    folder = resources.sample_inputs_dir()
    return [p for name in PROMPT_FILES for p in read_prompt_file(folder / name)]


def bench_dataset(
    recipe: ModelRecipe,
    prompts: Sequence[str],
    *,
    address: str,
    workers: Sequence[int] = RAY_WORKERS,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[str], None] | None = None,
) -> list[DatasetBenchRow]:
    """One in-process row, then one Ray row per worker count (see the module docstring)."""

    def say(message: str) -> None:
        if progress is not None:
            progress(f"bench: {message}")

    say("in-process")
    start = time.perf_counter()
    llm = load_model(recipe.spec, device=recipe.device, dtype=recipe.dtype)
    dataset_frequencies(llm, prompts[:1], threshold=threshold)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    reference = dataset_frequencies(llm, prompts, threshold=threshold)
    rows = [_row("in-process", 1, len(prompts), startup, time.perf_counter() - start, True)]
    del llm  # the workers load their own
    for n in workers:
        say(f"Ray, {n} worker(s)")
        start = time.perf_counter()
        with worker_pool(recipe, RayOptions(address, n)) as pool:
            pool.dataset(prompts[:n], threshold)  # one prompt per worker: each one warm
            startup = time.perf_counter() - start
            start = time.perf_counter()
            table = pool.dataset(prompts, threshold)
            seconds = time.perf_counter() - start
        rows.append(_row("ray", n, len(prompts), startup, seconds, same_table(table, reference)))
    return rows


def same_table(table: pd.DataFrame, reference: pd.DataFrame) -> bool:
    """Whether ``table`` is ``reference``: the same rows and counts, floats within
    :data:`WEIGHT_RTOL`."""
    try:
        pd.testing.assert_frame_equal(table, reference, check_exact=False, rtol=WEIGHT_RTOL)
    except AssertionError:
        return False
    return True


def _row(
    mode: str, workers: int, n: int, startup: float, seconds: float, same: bool
) -> DatasetBenchRow:
    return DatasetBenchRow(
        mode=mode,
        workers=workers,
        prompts=n,
        startup_s=round(startup, 2),
        seconds=round(seconds, 3),
        prompts_per_s=round(n / seconds, 2),
        same_table=same,
    )


def format_rows(rows: Sequence[DatasetBenchRow]) -> str:
    header = ("mode", "workers", "prompts", "startup_s", "seconds", "prompts/s", "same_table")
    lines = ["  ".join(f"{h:>12}" for h in header)]
    for r in rows:
        cells = (
            r.mode,
            r.workers,
            r.prompts,
            f"{r.startup_s:.1f}",
            f"{r.seconds:.2f}",
            f"{r.prompts_per_s:.2f}",
            "yes" if r.same_table else "NO",
        )
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def dataset_bench_command(args: argparse.Namespace) -> None:
    """``llm-flow bench --dataset [--ray ADDRESS]``."""
    from llm_flow.cli.bench import device_name

    config = config_arg(args.config)
    recipe = ModelRecipe(model_spec(args, config), device=args.device, dtype=args.dtype)
    rows = bench_dataset(recipe, bench_prompts(), address=args.ray, progress=stderr_progress())
    if args.json:
        write_out(json.dumps([r.to_dict() for r in rows], indent=2), None)
        return
    import torch

    where = device_name(torch.device(args.device or "cpu"))
    title = f"{recipe.spec.name}, dataset mode, driver on {where} ({args.dtype})"
    write_out(title + "\n" + format_rows(rows), None)
