"""``llm-flow dataset|index --ray`` and ``bench --dataset`` on a local 2-worker CPU cluster
(started once for the module): the outputs equal the in-process ones byte for byte, a worker's
error reaches the user as the in-process error does, and without ``--ray`` Ray is never
imported."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from llm_flow.cli import parser
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import prompt, tiny_hf_model, tiny_tokenizer
from tests.unit.analyses.test_latents import random_sae

ROOT = Path(__file__).resolve().parents[2]
CLI_MAIN = "import sys; from llm_flow.cli import main; sys.exit(main())"
INDEX_FILES = ("examples.parquet", "histograms.parquet", "windows.parquet")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A local Ray cluster of 2 CPUs, no dashboard, no usage report; shut down at the end."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def warm_driver() -> Iterator[None]:
    """This process computes as each worker of the 2-CPU cluster does: warm (numba's threading
    layer sets torch's thread count when it starts, so a cold run computes its first prompt with
    other threads than the rest) and on one thread, the workers' share of the cores. Another
    thread count moves float sums by an ulp."""
    import numba
    import torch

    from llm_flow.engine.graph import contributions_of
    from tests.tiny import tiny_llm

    contributions_of(tiny_llm("llama-gqa").run("w1 w2 w3").layers[0])
    threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(threads[0])
    numba.set_num_threads(threads[1])


@pytest.fixture(scope="module")
def files(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json (a dense and a mixture-of-experts tiny model, one that cannot load),
    prompts.txt (9 prompts) and corpus.txt (40 windows of 10 tokens: 3 chunks of work)."""
    folder = tmp_path_factory.mktemp("ray")
    config = {
        "models": {
            "tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))},
            "moe": {"source": "local", "path": str(saved_tiny("qwen2-moe"))},
            "missing": {"source": "local", "path": str(folder / "no-such-model")},
        },
        "default_model": "tiny",
    }
    (folder / "config.json").write_text(json.dumps(config), "utf-8")
    lines = [prompt(4 + i, seed=i) for i in range(9)]
    (folder / "prompts.txt").write_text("\n".join(lines), "utf-8")
    corpus = "\n".join(prompt(9, seed=i) for i in range(40))
    (folder / "corpus.txt").write_text(corpus, "utf-8")
    return folder


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert (code, err) == (0, ""), err
    return out


@pytest.mark.parametrize("model", ["tiny", "moe"])
def test_dataset_on_ray_writes_the_in_process_table(
    cluster: Any, capsys: pytest.CaptureFixture[str], files: Path, model: str
) -> None:
    base = ["dataset", "--config", str(files / "config.json"), "--model", model]
    base += ["--prompts", str(files / "prompts.txt"), "--threshold", "0.02"]
    here = ok(capsys, *base)
    there = ok(capsys, *base, "--ray", "--workers", "2")
    assert there == here  # CSV writes every float exactly (shortest repr)
    frame = pd.read_csv(io.StringIO(there))
    assert (frame["n_prompts"] == 9).all() and frame["count"].sum() > 0
    if model == "moe":  # the routed and the shared experts' rows came back from the workers
        assert {"expert", "shared_expert"} <= set(frame["kind"])


def _index(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    files: Path,
    cache: Path,
    *flags: str,
) -> Path:
    """Index the corpus with the index cache in ``cache``; the index's folder."""
    monkeypatch.setenv("LLM_FLOW_CACHE", str(cache))
    argv = ["index", "--config", str(files / "config.json"), "--corpus", str(files / "corpus.txt")]
    summary = json.loads(ok(capsys, *argv, "--window", "10", "--k", "3", *flags))
    assert summary["windows"] == 40 and summary["tokens"] == 40 * 9
    return Path(summary["index"])


def test_index_on_ray_writes_the_in_process_index(
    cluster: Any,
    capsys: pytest.CaptureFixture[str],
    files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = _index(capsys, monkeypatch, files, tmp_path / "here")
    there = _index(capsys, monkeypatch, files, tmp_path / "there", "--ray", "--workers", "2")
    assert here.name == there.name  # the same cache key
    for name in INDEX_FILES:
        assert pq.read_table(here / name).equals(pq.read_table(there / name)), name
    meta = [json.loads((d / "index.json").read_text("utf-8")) for d in (here, there)]
    for m in meta:
        assert m.pop("seconds") > 0
    assert meta[0] == meta[1]
    assert meta[0]["spans"] == [[0, 40]]


def test_the_api_builds_the_same_index_on_ray_with_progress_per_chunk(
    cluster: Any, files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llm_flow as lf

    model = lf.load("tiny", config=files / "config.json")
    corpus = files / "corpus.txt"
    saes = [random_sae("blocks.0.hook_resid_post")]  # its latents travel to the workers
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "here"))
    here = lf.build_index(model, corpus, layers=[1], window=10, saes=saes)
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "there"))
    seen: list[tuple[int, int]] = []
    there = lf.build_index(
        model,
        corpus,
        layers=[1],
        window=10,
        saes=saes,
        ray=True,
        workers=2,
        progress=lambda *p: seen.append(p),
    )
    # 40 windows in chunks of 16: three calls, cumulative, ending at the whole corpus.
    assert len(seen) == 3 and seen == sorted(seen) and seen[-1] == (40, 360)
    assert ("latent", 0) in here.top and there.settings == here.settings
    assert there.windows == here.windows and there.top.keys() == here.top.keys()
    for key, top in here.top.items():
        for field in ("values", "windows", "positions", "extra"):
            a, b = getattr(top, field), getattr(there.top[key], field)
            assert a.tobytes() == b.tobytes(), (key, field)
    for key, counts in here.histograms.items():
        assert (there.histograms[key] == counts).all()

    with pytest.raises(lf.LlmFlowError, match="load it with lf.load"):
        lf.build_index(lf.from_hf(tiny_hf_model("llama-gqa"), tiny_tokenizer()), corpus, ray=True)


def test_a_worker_error_is_the_in_process_error(
    cluster: Any, capsys: pytest.CaptureFixture[str], files: Path
) -> None:
    base = ["dataset", "--config", str(files / "config.json"), "--model", "missing"]
    base += ["--prompts", str(files / "prompts.txt")]
    errors = []
    for flags in ((), ("--ray",)):
        code, out, err = run_cli(capsys, *base, *flags)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        errors.append(err)
    assert errors[0] == errors[1] and "no-such-model" in errors[0]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--workers", "0"), "workers must be at least 1"),
        (("--device", "cuda", "--workers", "1"), "the Ray cluster has 0 GPU"),
    ],
)
def test_bad_worker_requests_are_one_line(
    cluster: Any,
    capsys: pytest.CaptureFixture[str],
    files: Path,
    flags: tuple[str, ...],
    needle: str,
) -> None:
    code, out, err = run_cli(
        capsys,
        *("dataset", "--config", str(files / "config.json")),
        *("--prompts", str(files / "prompts.txt"), "--ray", *flags),
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("command", ["dataset", "index"])
def test_workers_without_ray_is_one_line(
    capsys: pytest.CaptureFixture[str], files: Path, command: str
) -> None:
    source = ("--prompts", "prompts.txt") if command == "dataset" else ("--corpus", "corpus.txt")
    code, out, err = run_cli(
        capsys,
        *(command, "--config", str(files / "config.json")),
        *(source[0], str(files / source[1]), "--workers", "2"),
    )
    assert (code, out) == (2, "")
    assert err == "llm-flow: error: --workers goes with --ray; add --ray to run on Ray workers\n"


def test_without_ray_installed_the_error_says_how_to_install_it(
    capsys: pytest.CaptureFixture[str], files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, out, err = run_cli(
        capsys,
        *("index", "--config", str(files / "config.json")),
        *("--corpus", str(files / "corpus.txt"), "--ray"),
    )
    assert code == 2 and out == ""
    needs = "running on Ray needs the ray package: pip install 'llm-flow[ray]'"
    assert err == f"llm-flow: error: {needs}\n"


def test_bench_dataset_reports_in_process_and_ray_rows(
    cluster: Any, capsys: pytest.CaptureFixture[str], files: Path
) -> None:
    rows = json.loads(
        ok(capsys, "bench", "--dataset", "--json", "--config", str(files / "config.json"))
    )
    assert [(r["mode"], r["workers"]) for r in rows] == [("in-process", 1), ("ray", 1), ("ray", 2)]
    for r in rows:
        assert r["prompts"] == 45 and r["seconds"] > 0 and r["prompts_per_s"] > 0
        assert r["same_table"] is True


def _cli_in_a_child(*argv: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-c", CLI_MAIN, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_without_ray_flag_ray_is_never_imported(files: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from llm_flow.cli import main\n"
        f"assert main(['dataset', '--config', {str(files / 'config.json')!r}, "
        f"'--prompts', {str(files / 'prompts.txt')!r}]) == 0\n"
        f"assert main(['index', '--config', {str(files / 'config.json')!r}, "
        f"'--corpus', {str(files / 'corpus.txt')!r}, '--window', '10', '--k', '2']) == 0\n"
        "assert main(['bench', '--config', "
        f"{str(files / 'config.json')!r}, '--tokens', '8']) == 0\n"
        "found = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print('RAY MODULES', found)\n"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "LLM_FLOW_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "RAY MODULES []" in done.stdout


def test_an_unreachable_address_is_one_line(files: Path) -> None:
    done = _cli_in_a_child(
        *("dataset", "--config", str(files / "config.json")),
        *("--prompts", str(files / "prompts.txt"), "--ray", "127.0.0.1:1"),
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("llm-flow: error: cannot connect to the Ray cluster at ")
    assert done.stderr.count("\n") == 1 and "ray start --head" in done.stderr


def test_the_parser_defaults_are_the_modules() -> None:
    from llm_flow import distributed

    assert parser.RAY_LOCAL == distributed.LOCAL
    assert parser.RAY_CPU_WORKERS == distributed.DEFAULT_CPU_WORKERS


def test_the_bench_compares_counts_exactly_and_weights_to_float32_rounding() -> None:
    from llm_flow.cli.bench_dataset import WEIGHT_RTOL, same_table

    table = pd.DataFrame({"kind": ["head", "ffn"], "count": [3, 5], "mean_weight": [0.25, 0.5]})
    rounded = table.assign(mean_weight=table["mean_weight"] * (1 + WEIGHT_RTOL / 10))
    assert same_table(rounded, table)
    assert not same_table(table.assign(mean_weight=[0.25, 0.5001]), table)
    assert not same_table(table.assign(count=[3, 6]), table)
    assert not same_table(table.iloc[:1], table)
