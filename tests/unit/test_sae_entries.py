"""A model entry's "saes" key: hook names checked, relative paths resolved, hub repos kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_flow.config import ModelSpec, load_config
from llm_flow.errors import ConfigError


def config(tmp_path: Path, saes: object) -> Path:
    entry = {"source": "hub", "saes": saes}
    path = tmp_path / "config" / "local.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": {"gpt2": entry}}))
    return path


def test_saes_resolve_paths_and_keep_repos(tmp_path: Path) -> None:
    (tmp_path / "saes" / "l3").mkdir(parents=True)
    saes = {
        "blocks.3.hook_resid_post": "saes/l3",
        "blocks.0.hook_resid_pre": "google/gemma-scope-2b-pt-res/layer_0/width_16k",
    }
    spec = load_config(config(tmp_path, saes)).model("gpt2")
    assert dict(spec.saes) == {
        "blocks.3.hook_resid_post": str(tmp_path / "saes" / "l3"),
        "blocks.0.hook_resid_pre": "google/gemma-scope-2b-pt-res/layer_0/width_16k",
    }
    hash(spec)


@pytest.mark.parametrize(
    ("saes", "fragment"),
    [
        ({"blocks.3.attn.hook_z": "x"}, "is not a residual hook name"),
        ({"blocks.3.hook_resid_post": ""}, "expected an SAE folder"),
        ({"blocks.3.hook_resid_post": 3}, "expected an SAE folder"),
        (["blocks.3.hook_resid_post"], "expected an object hook"),
    ],
)
def test_bad_saes_name_the_key(tmp_path: Path, saes: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(config(tmp_path, saes))


def test_spec_in_code_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="not a residual hook name"):
        ModelSpec(name="gpt2", source="hub", saes={"nope": "x"})  # type: ignore[arg-type]
