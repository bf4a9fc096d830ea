"""The SAE part of the Python API: lf.load_sae, lf.latents, lf.ablate_latents."""

from __future__ import annotations

from pathlib import Path

import pytest

import llm_flow as lf
from llm_flow.errors import SaeError
from llm_flow.models.sae import save_sae, trained_sae_dir
from tests.tiny import prompt, tiny_llm
from tests.unit.analyses.test_latents import random_sae

HOOK = "blocks.0.hook_resid_post"


def test_latents_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path))
    tr = lf.trace(tiny_llm("llama-gqa"), prompt(5))
    with pytest.raises(SaeError, match="PATH_OR_REPO"):
        lf.latents(tr, "I0_2")
    folder = save_sae(random_sae(HOOK), trained_sae_dir(tr.llm.info.name, HOOK))
    sae = lf.load_sae(folder)
    from_cache = lf.latents(tr, "I0_2", top=4)  # the trained one, found in the cache
    assert from_cache == lf.latents(tr, "I0_2", sae, top=4) == lf.latents(tr, "I0_2", folder, top=4)
    data = from_cache.to_json()
    total = data["latents_contribution"] + data["b_dec_contribution"] + data["error_contribution"]
    assert total == pytest.approx(1) and len(data["latents"]) == 4
    result = lf.ablate_latents(tr, folder, [0, 1], target=" w1", distractor=" w2")
    assert result.before.logit_diff != result.after.logit_diff


def test_edge_latents_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path))
    tr = lf.trace(tiny_llm("gpt2-bias"), prompt(5))
    with pytest.raises(SaeError, match="PATH_OR_REPO"):
        lf.edge_latents(tr, "I0_1->A1_3")
    folder = save_sae(random_sae(HOOK), trained_sae_dir(tr.llm.info.name, HOOK))
    found = lf.edge_latents(tr, "I0_1->A1_3", top=4)  # the source I0_1's SAE, from the cache
    assert found == lf.edge_latents(tr, "I0_1->A1_3", folder, top=4)
    data = found.to_json()
    total = sum(data[f"{p}_contribution"] for p in ("latents", "b_dec", "bias", "error"))
    assert total == pytest.approx(1) and len(data["latents"]) == 4
    assert data["bias_contribution"] > 0  # GPT-2's LayerNorm and value biases
    with pytest.raises(SaeError, match="reads 'blocks.0.hook_resid_post'"):
        lf.edge_latents(tr, "I1_1->A2_3", folder)
