"""``llm-flow attend``: the JSON of the CLI contract on tiny local models, and its errors (exit 2,
one stderr line)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import prompt

PROMPT = prompt(6)  # 7 tokens with BOS
SPLIT_KEYS = {"score", "terms_sum", "remainder", "query_terms", "key_terms", "pairs"}


@pytest.fixture(scope="module")
def config_file(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "models": {
            "tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))},
            "tiny-gpt2": {"source": "local", "path": str(saved_tiny("gpt2-bias"))},
            "tiny-moe": {"source": "local", "path": str(saved_tiny("qwen2-moe"))},
        },
        "default_model": "tiny",
    }
    path = tmp_path_factory.mktemp("attend") / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _attend(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> dict[str, Any]:
    code, out, err = run_cli(capsys, "attend", "--config", str(config), "--prompt", PROMPT, *extra)
    assert (code, err) == (0, ""), err
    data: dict[str, Any] = json.loads(out)
    return data


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
def test_attend_prints_terms_that_sum_to_the_score(
    capsys: pytest.CaptureFixture[str], config_file: Path, model: str
) -> None:
    args = ("--model", model, "--layer", "2", "--head", "1", "--query", "-1", "--source", "-3")
    data = _attend(capsys, config_file, *args, "--top", "10000")
    assert set(data) >= SPLIT_KEYS and {"attention", "contrast", "tokens", "model"} <= set(data)
    assert (data["query"], data["source"]) == (6, 4)
    assert 0 < data["attention"] < 1
    assert data["contrast"]["others"] == 6
    for split in (data, data["contrast"]):
        assert set(split) >= SPLIT_KEYS
        score = split["score"]
        bound = 1e-4 * max(abs(score), 1.0)
        assert abs(split["terms_sum"] - score) <= bound  # both models' scores are bilinear
        assert abs(math.fsum(t["value"] for t in split["query_terms"]) - score) <= bound
        assert abs(math.fsum(t["value"] for t in split["key_terms"]) - score) <= bound
        assert abs(math.fsum(p["value"] for p in split["pairs"]) - score) <= bound
        assert set(split["pairs"][0]) == {"query_component", "key_component", "value"}
    assert {t["component"] for t in data["query_terms"]} >= {"X0_6", "A1_6.h3", "M0_6", "bias"}
    assert {t["component"] for t in data["key_terms"]} >= {"X0_4", "A0_4.h0", "M1_4", "bias"}


def test_experts_name_each_expert(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    args = ("--model", "tiny-moe", "--layer", "2", "--head", "0", "--query", "-1", "--source", "0")
    data = _attend(capsys, config_file, *args, "--top", "10000", "--experts")
    names = {t["component"] for t in data["query_terms"]}
    assert "M1_6.shared" in names and any(n.startswith("M1_6.e") for n in names)
    assert "M1_6" not in names
    assert abs(math.fsum(t["value"] for t in data["query_terms"]) - data["score"]) <= 1e-4


def test_top_limits_each_table(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    args = ("--layer", "1", "--head", "0", "--query", "3", "--source", "3", "--top", "2")
    data = _attend(capsys, config_file, *args)
    assert len(data["query_terms"]) == len(data["key_terms"]) == len(data["pairs"]) == 2
    assert len(data["contrast"]["pairs"]) == 2


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--layer", "3", "--head", "0", "--query", "-1", "--source", "0"), "layer 3 is out"),
        (("--layer", "0", "--head", "9", "--query", "-1", "--source", "0"), "head 9 is out"),
        (("--layer", "0", "--head", "0", "--query", "2", "--source", "5"), "comes after query"),
        (("--layer", "0", "--head", "0", "--query", "7", "--source", "0"), "query position 7"),
        (("--layer", "0", "--head", "0", "--query", "-1", "--source", "-8"), "source position -8"),
        (("--layer", "0", "--head", "0", "--query", "1", "--source", "0", "--top", "0"), "top"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], config_file: Path, extra: tuple[str, ...], needle: str
) -> None:
    code, out, err = run_cli(
        capsys, "attend", "--config", str(config_file), "--prompt", PROMPT, *extra
    )
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("llm-flow: error: ")
    assert needle in err
