"""The CLI on the real packaged default model, in-process and through the installed console
script (``llm-flow``), so the entry point itself is proven to work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_flow.cli import main
from llm_flow.models import BridgeLlm

pytestmark = pytest.mark.integration

PARIS = "The capital of France is"
SCRIPT = Path(sys.executable).parent / "llm-flow"


def test_graph_predicts_paris_and_the_route_reaches_the_output(
    capsys: pytest.CaptureFixture[str], packaged_llm: BridgeLlm
) -> None:
    assert main(["graph", "--prompt", PARIS]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = json.loads(out)
    assert data["model"] == packaged_llm.info.name
    assert data["prediction"]["token"] == " Paris"
    assert data["token_ids"] == packaged_llm.tokenize(PARIS)
    assert data["tokens"] == ["The", " capital", " of", " France", " is"]
    n_layers, last = data["n_layers"], len(data["token_ids"]) - 1
    assert (n_layers, data["position"]) == (packaged_llm.info.n_layers, last)
    ids = {node["id"] for node in data["nodes"]}
    assert f"I{n_layers - 1}_{last}" in ids
    assert any(e["target"] == f"I{n_layers - 1}_{last}" for e in data["edges"])
    assert all(e["source"] in ids and e["target"] in ids for e in data["edges"])


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), f"console script missing: {SCRIPT} (pip install -e .)"
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
        check=False,
    )


def test_console_script_info() -> None:
    proc = run_script("info")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    info = json.loads(proc.stdout)
    assert info["name"] == "SmolLM2-135M-Instruct (packaged)"
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"]) == (30, 9, 3)


def test_console_script_error_is_one_line() -> None:
    proc = run_script("info", "--model", "no-such-model")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-flow: error: "), proc.stderr
    assert "SmolLM2-135M-Instruct (packaged)" in lines[0]
