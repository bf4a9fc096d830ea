"""Tests for app/saes.py: which SAE a node or hook has (as the CLI finds it), and that an SAE is
read once until its weights change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import saes
from llm_flow.config import ModelSpec
from llm_flow.errors import SaeError
from llm_flow.models.sae import WEIGHTS_FILE, save_sae, trained_sae_dir
from tests.unit.analyses.test_latents import random_sae

HOOK = "blocks.1.hook_resid_post"


def test_a_node_s_sae_is_the_config_s_else_the_trained_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name="tiny", source="local", path=tmp_path)
    assert saes.node_sae(spec, "I", 1) is None and saes.model_sae_hooks(spec) == ()
    with pytest.raises(SaeError, match="has no SAEs"):
        saes.hook_sae(spec, HOOK)
    trained = save_sae(random_sae(HOOK), trained_sae_dir("tiny", HOOK))
    ref = saes.node_sae(spec, "I", 1)
    assert ref is not None and (ref.hook, ref.source) == (HOOK, str(trained))
    # The next layer's input is the same node: the same SAE.
    assert saes.hook_sae(spec, "blocks.2.hook_resid_pre") == ref
    with pytest.raises(SaeError, match=f"it has SAEs on {HOOK}"):
        saes.hook_sae(spec, "blocks.0.hook_resid_post")

    configured = save_sae(random_sae(HOOK, seed=1), tmp_path / "configured")
    spec = ModelSpec(name="tiny", source="local", path=tmp_path, saes=((HOOK, str(configured)),))
    ref = saes.node_sae(spec, "I", 1)
    assert ref is not None and ref.source == str(configured)

    computed = saes.store().computed
    loaded = saes.get_sae(ref)
    assert saes.get_sae(ref) is loaded and saes.store().computed == computed + 1
    weights = configured / WEIGHTS_FILE  # retrained in place: a new key, read again
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    newer = saes.node_sae(spec, "I", 1)
    assert newer is not None and newer != ref and saes.get_sae(newer) is not loaded
