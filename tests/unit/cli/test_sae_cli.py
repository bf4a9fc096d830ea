"""``llm-flow sae train``, ``llm-flow latents`` and ``ablate --latents`` through the real entry
point, on a tiny model and a tiny corpus; every error is exit 2 with one stderr line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llm_flow.models.sae import load_sae
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import prompt

PROMPT = prompt(6)
HOOK = "blocks.1.hook_resid_post"
CONTRAST = ("--target", " w1", "--distractor", " w2")


@pytest.fixture(scope="module")
def setup(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sae-cli")
    config = {"models": {"tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))}}}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "corpus.txt").write_text(prompt(700, seed=1), encoding="utf-8")
    return {"config": folder / "config.json", "corpus": folder / "corpus.txt", "cache": folder}


@pytest.fixture
def cli(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(setup["cache"] / "cache"))

    def run(*argv: str) -> tuple[int, str, str]:
        return run_cli(capsys, argv[0], *argv[1:], "--config", str(setup["config"]))

    return run


@pytest.fixture
def trained(cli: Any, setup: dict[str, Path]) -> dict[str, Any]:
    code, out, err = cli(
        "sae", "train", "--layer", "1", "--corpus", str(setup["corpus"]),
        "--d-sae", "32", "--k", "4", "--steps", "30", "--batch-size", "64",
    )  # fmt: skip
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def test_train_writes_a_loadable_folder_in_the_cache(
    trained: dict[str, Any], setup: dict[str, Path]
) -> None:
    assert Path(trained["path"]) == setup["cache"] / "cache" / "saes" / "tiny" / HOOK
    sae = load_sae(trained["path"])
    assert (sae.hook, sae.architecture, sae.d_sae, sae.k) == (HOOK, "topk", 32, 4)
    assert -1 < trained["explained_variance"] <= 1
    assert 0 < trained["l0"] <= 4
    assert trained["heldout_tokens"] > 0 and trained["train_tokens"] > trained["heldout_tokens"]


def test_latents_finds_the_trained_sae(trained: dict[str, Any], cli: Any) -> None:
    code, out, err = cli("latents", "--prompt", PROMPT, "--node", "I1_3", "--top", "3")
    assert code == 0, err
    data = json.loads(out)
    assert (data["node"], data["hook"]) == ("I1_3", HOOK)
    assert len(data["latents"]) == min(3, data["l0"])
    assert {"index", "activation", "contribution", "direct_effect"} <= set(data["latents"][0])
    total = data["latents_contribution"] + data["b_dec_contribution"] + data["error_contribution"]
    assert total == pytest.approx(1)
    assert "explained_variance" in data and data["l0"] <= 4


def test_latents_with_sae_path_and_contrast(trained: dict[str, Any], cli: Any) -> None:
    code, out, err = cli(
        "latents", "--prompt", PROMPT, "--node", "I1_2", "--sae", trained["path"],
        "--target", " w1", "--distractor", " w2",
    )  # fmt: skip
    assert code == 0, err
    assert all("direct_effect_diff" in latent for latent in json.loads(out)["latents"])


def test_latents_of_an_edge(trained: dict[str, Any], cli: Any) -> None:
    code, out, err = cli("latents", "--prompt", PROMPT, "--edge", "I1_2->A2_4", "--top", "3")
    assert code == 0, err
    data = json.loads(out)
    assert (data["edge"], data["source"], data["target"]) == ("I1_2->A2_4", "I1_2", "A2_4")
    assert data["hook"] == HOOK and len(data["latents"]) == min(3, data["l0"])
    total = sum(data[f"{part}_contribution"] for part in ("latents", "b_dec", "bias", "error"))
    assert total == pytest.approx(1)


def test_ablate_latents_diffs_the_route(trained: dict[str, Any], cli: Any) -> None:
    code, out, err = cli(
        "ablate", "--prompt", PROMPT, "--latents", f"{HOOK}:0,1,2,3", "--graph-diff",
        "--scale", "0.5",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["ablated"]["latents"] == {"hook": HOOK, "indices": [0, 1, 2, 3], "scale": 0.5}
    assert "graph_diff" in data


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("latents", "--prompt", PROMPT, "--node", "I0_3"), '"saes": {"blocks.0.hook_resid_post"'),
        (("latents", "--prompt", PROMPT, "--node", "M1_3"), "unknown node id"),
        (("latents", "--prompt", PROMPT, "--node", "I1_3", "--sae", "/nope"), "no SAE at"),
        (("latents", "--prompt", PROMPT, "--edge", "I1_3"), "not an attention edge"),
        (("latents", "--prompt", PROMPT, "--edge", "I0_2->A1_3"), '"saes": {"blocks.0.hook'),
        (("latents", "--prompt", PROMPT, "--edge", "I0_2->A1_9"), "outside this run"),
        (("latents", "--prompt", PROMPT, "--edge", "I1_2->A2_4", *CONTRAST), "go with --node"),
        (("latents", "--prompt", PROMPT, "--edge", "I1_2->A2_4", "--node", "I1_2"), "not allowed"),
        (("ablate", "--prompt", PROMPT, "--sae", "x"), "--sae goes with --latents"),
        (("ablate", "--prompt", PROMPT, "--latents", "blocks.1.hook_resid_post"), "HOOK:I"),
        (("sae", "train", "--layer", "9"), "outside 0..2"),
        (
            ("sae", "train", "--layer", "0", "--corpus", "/nope.txt"),
            "corpus file 'nope.txt' not found",
        ),
    ],
)
def test_errors_are_one_line_exit_2(cli: Any, argv: tuple[str, ...], fragment: str) -> None:
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and fragment in err, err
