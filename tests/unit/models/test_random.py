"""Random-weight models of real shapes (llm_flow/models/random.py): the shipped shapes are the
published models' sizes, models are built where they will run, and `random:SHAPE` works from a
config file, the CLI and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llm_flow as lf
from llm_flow.config import ModelSpec, load_config, spec_from_name
from llm_flow.errors import ConfigError, ModelLoadError, UnknownModelError
from llm_flow.models import load_model
from llm_flow.models.random import byte_tokenizer, random_model, shape_config, shape_names
from tests.cli_runner import run_cli
from tests.unit.models.conftest import ShapeFile

# Parameter counts published with each model (model cards), in billions, to 0.5 %.
PUBLISHED = {
    "Llama-3.1-8B": 8.03,
    "Llama-3.1-70B": 70.6,
    "Qwen2.5-7B": 7.61,
    "Qwen2.5-0.5B": 0.494,
    "Gemma-2-9B": 9.24,
    "Mixtral-8x7B": 46.7,
    "Qwen3-30B-A3B": 30.5,
}


@pytest.fixture
def tiny_shape(shape_file: ShapeFile) -> Path:
    return shape_file(2)


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_every_shipped_shape_has_its_published_size(shape: str) -> None:
    model = random_model(shape, torch.device("meta"), torch.bfloat16)  # no memory used
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    assert n_params == pytest.approx(PUBLISHED[shape], rel=5e-3)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())


def test_the_shipped_shapes_are_the_listed_ones() -> None:
    assert shape_names() == tuple(sorted(PUBLISHED))


def test_a_random_model_runs_self_checked_and_is_reproducible(
    tiny_shape: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name="tiny", source="random", shape=str(tiny_shape))
    llm = load_model(spec)
    run = llm.run("héllo")  # every self-check runs on every layer
    assert run.n_tokens == 1 + 6  # BOS and one token per UTF-8 byte (é is two)
    assert llm.decode(llm.encode("héllo ✓")) == "héllo ✓"  # bytes, so any text round-trips
    again = load_model(spec).run("héllo")
    assert torch.equal(run.logits, again.logits)  # a fixed seed: the same weights every time


def test_bad_shapes_and_specs_say_what_is_valid(tiny_shape: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="shipped shapes are Gemma-2-9B, Llama-3.1-70B"):
        shape_config("Llama-9")
    broken = tmp_path / "broken.json"
    broken.write_text("{}", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not a usable config.json"):
        shape_config(str(broken))
    with pytest.raises(ConfigError, match="needs a 'shape'"):
        ModelSpec(name="r", source="random")
    with pytest.raises(ConfigError, match="only allowed with source 'random'"):
        ModelSpec(name="r", source="hub", shape="Llama-3.1-8B")
    with pytest.raises(ConfigError, match="name a shape"):
        spec_from_name("random:")
    assert spec_from_name(f"random:{tiny_shape}").shape == str(tiny_shape)
    with pytest.raises(ConfigError, match="disabled on this server"):
        spec_from_name("random:Llama-3.1-70B", allow_paths=False)  # demo mode


def test_config_entries_cli_and_api_take_random_shapes(
    capsys: pytest.CaptureFixture[str],
    tiny_shape: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "config.json"
    entry = {"source": "random", "shape": str(tiny_shape)}
    config.write_text(json.dumps({"models": {"tiny-random": entry}}), encoding="utf-8")
    assert load_config(config).model("tiny-random").shape == str(tiny_shape)
    # Unconfigured random:SHAPE names work everywhere a model name does.
    assert load_config(config).model("random:Qwen2.5-7B").shape == "Qwen2.5-7B"
    demo = tmp_path / "demo.json"
    demo.write_text(json.dumps({"models": {"r": entry}, "demo_mode": True}), encoding="utf-8")
    with pytest.raises(UnknownModelError):
        load_config(demo).model("random:Qwen2.5-7B")
    code, out, err = run_cli(
        capsys, "info", "--config", str(config), "--model", f"random:{tiny_shape}"
    )
    assert code == 0, err
    assert json.loads(out)["n_layers"] == 2
    code, out, err = run_cli(capsys, "info", "--config", str(config), "--model", "random:Nope")
    assert code == 2 and out == "" and "unknown shape 'Nope'" in err
    assert len(err.strip().splitlines()) == 1
    llm = lf.load("tiny-random", config=config)
    assert lf.trace(llm, "ab").tokens == ("<bos>", "a", "b")


def test_the_byte_tokenizer_is_saved_once(tmp_path: Path) -> None:
    first = byte_tokenizer(tmp_path / "bytes")
    stamp = (tmp_path / "bytes" / "tokenizer.json").stat().st_mtime_ns
    second = byte_tokenizer(tmp_path / "bytes")
    assert (tmp_path / "bytes" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert (
        first("a")["input_ids"]
        == second("a")["input_ids"]
        == [256, first.convert_tokens_to_ids("a")]
    )
