"""``llm-flow index`` then ``llm-flow top`` through the real CLI entry point, on tiny models saved
to disk: the summary line, the ``top`` contract of docs/architecture.md, and every error as exit
code 2 with one stderr line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import prompt, tiny_llm

EXAMPLE_KEYS = {"token_ids", "position", "token", "text", "activation"}


@pytest.fixture
def setup(
    saved_tiny: SavedTiny,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[str, str]:
    """(config file, corpus file), with the index cache in a fresh folder."""
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    config = {
        "models": {
            "tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))},
            "moe": {"source": "local", "path": str(saved_tiny("qwen2-moe"))},
        },
        "default_model": "tiny",
    }
    (tmp_path / "config.json").write_text(json.dumps(config), "utf-8")
    (tmp_path / "corpus.txt").write_text("\n".join(prompt(12, seed=i) for i in range(12)), "utf-8")
    capsys.readouterr()  # saving the tiny models reports progress
    return str(tmp_path / "config.json"), str(tmp_path / "corpus.txt")


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run_cli(capsys, *argv)
    assert (code, err) == (0, ""), err
    return json.loads(out)


def one_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("llm-flow: error: ") and err.count("\n") == 1, err
    return err


def test_index_then_top_round_trip(
    capsys: pytest.CaptureFixture[str], setup: tuple[str, str]
) -> None:
    config, corpus = setup
    base = ("--config", config, "--corpus", corpus)
    err = one_error(capsys, "top", "--neuron", "1.5", *base)
    assert "llm-flow index --layers 1" in err and f"--corpus {corpus}" in err

    summary = cli_json(capsys, "index", *base, "--layers", "1-2", "--window", "10", "--k", "3")
    assert Path(summary["index"]).is_dir()
    assert summary["layers"] == [1, 2] and summary["windows"] == 16  # 144 words, 9 per window
    assert summary["tokens"] == 144 and summary["units"] == {
        "neuron": 96,
        "head": 8,
        "expert": 0,
        "latent": 0,
    }
    assert cli_json(capsys, "index", *base, "--layers", "1-2", "--window", "10", "--k", "3") == (
        summary
    )

    llm = tiny_llm("llama-gqa")
    for flag, unit in (("--neuron", "1.5"), ("--head", "2.3")):
        data = cli_json(capsys, "top", flag, unit, *base, "--k", "2")
        kind = flag.removeprefix("--")
        assert data["unit"] == f"{kind} {unit}"
        examples = data["examples"]
        assert len(examples) == 2
        assert all(set(e) >= EXAMPLE_KEYS for e in examples)
        values = [e["activation"] for e in examples]
        assert values == sorted(values, reverse=True)
        for e in examples:
            assert e["token"] == llm.token_strings([e["token_ids"][e["position"]]])[0]
            assert e["text"] == llm.decode(e["token_ids"])
        assert sum(data["histogram"]["counts"]) == summary["tokens"]
        assert len(data["histogram"]["counts"]) == len(data["histogram"]["edges"]) + 1
        explanation = data["explanation"]
        assert explanation["label"] == "automatic summary (no language model)"
        assert explanation["text"].startswith("automatic summary (no language model)")
        assert ("promoted" in explanation) == (kind == "neuron")
    assert "attention_away" in data["histogram"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("top", "--neuron", "1.48"), "neuron 48 does not exist in layer 1; valid: 0..47"),
        (("top", "--head", "3.0"), r"layer 3 does not exist; valid layers are 0..2"),
        (("top", "--expert", "1.0"), "is not a mixture of experts"),
        (("top", "--neuron", "x"), "LAYER.INDEX"),
        (("top", "--neuron", "1.0", "--k", "0"), "--k"),
        (("index", "--layers", "0,7"), "layer 7 does not exist"),
        (("index", "--layers", "a-b"), "0,3,5-7"),
        (("index", "--window", "1"), "--window"),
        (("top", "--neuron", "1.0", "--model", "moe"), "experts, not neurons"),
    ],
)
def test_bad_units_and_settings_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], setup: tuple[str, str], argv: tuple[str, ...], message: str
) -> None:
    config, corpus = setup
    err = one_error(capsys, *argv, "--config", config, "--corpus", corpus)
    assert message in err, err


def test_experts_of_a_mixture_of_experts_model(
    capsys: pytest.CaptureFixture[str], setup: tuple[str, str]
) -> None:
    config, corpus = setup
    base = ("--config", config, "--corpus", corpus, "--model", "moe")
    summary = cli_json(capsys, "index", *base, "--window", "10", "--k", "3", "--max-tokens", "40")
    assert summary["windows"] == 4 and summary["units"]["expert"] == 12

    data = cli_json(capsys, "top", "--expert", "2.3", *base)
    assert data["measure"] == "router_weight" and len(data["examples"]) == 3
    assert all(0 <= e["activation"] <= 1 for e in data["examples"])
    assert "promoted" in data["explanation"]


def test_latents_index_then_top(
    capsys: pytest.CaptureFixture[str], setup: tuple[str, str], tmp_path: Path
) -> None:
    from llm_flow.models.sae import save_sae
    from tests.unit.analyses.test_latents import D_SAE, random_sae

    config, corpus = setup
    hook = "blocks.1.hook_resid_post"
    folder = str(save_sae(random_sae(hook), tmp_path / "sae"))
    base = ("--config", config, "--corpus", corpus)
    err = one_error(capsys, "top", "--latent", f"{hook}:3", "--sae", folder, *base)
    assert f"llm-flow index --sae {folder}" in err and "covers the latents" in err
    summary = cli_json(capsys, "index", *base, "--sae", folder, "--window", "10", "--k", "3")
    assert summary["layers"] == [] and summary["units"]["latent"] == D_SAE
    assert [(s["hook"], s["source"]) for s in summary["saes"]] == [(hook, folder)]

    data = cli_json(capsys, "top", "--latent", f"{hook}:3", "--sae", folder, *base, "--k", "2")
    assert data["unit"] == f"latent {hook}:3" and data["hook"] == hook and data["index"] == 3
    assert len(data["examples"]) == 2 and all(set(e) >= EXAMPLE_KEYS for e in data["examples"])
    values = [e["activation"] for e in data["examples"]]
    assert values == sorted(values, reverse=True)
    assert sum(data["histogram"]["counts"]) == summary["tokens"]
    # A hook without --sae: the model's SAE there, of which the config names none.
    err = one_error(capsys, "index", *base, "--sae", "blocks.0.hook_resid_post")
    assert '"saes": {"blocks.0.hook_resid_post"' in err
    err = one_error(capsys, "top", "--latent", f"{hook}:{D_SAE}", "--sae", folder, *base)
    assert f"valid: 0..{D_SAE - 1}" in err
    assert "--sae goes with --latent" in one_error(capsys, "top", "--head", "1.0", "--sae", folder)
    assert "HOOK:INDEX" in one_error(capsys, "top", "--latent", hook, *base)
