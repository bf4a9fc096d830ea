"""Reading SAEs (SAELens folders, Gemma Scope npz) against encode/decode written from the
definitions in float64; hook ↔ node names; the offline hub error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llm_flow.errors import OfflineError, SaeError
from llm_flow.models.sae import (
    find_sae,
    hooks_of_node,
    load_sae,
    locate_sae,
    node_of_hook,
    sae_hooks,
    save_sae,
    trained_sae_dir,
)

D_IN, D_SAE = 8, 24


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.3,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen),
        "b_dec": torch.randn(D_IN, generator=gen),
        "threshold": torch.rand(D_SAE, generator=gen),
    }


def write_saelens(folder: Path, cfg: dict[str, object], seed: int = 0) -> dict[str, torch.Tensor]:
    """A SAELens 6 folder: cfg.json (hook under metadata) + sae_weights.safetensors."""
    w = weights(seed)
    if cfg.get("architecture") != "jumprelu":
        w.pop("threshold")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    full = {"d_in": D_IN, "d_sae": D_SAE, "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
    (folder / "cfg.json").write_text(json.dumps(full | cfg))
    return w


def reference(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: dict[str, object]) -> torch.Tensor:
    """SAELens's forward pass from its definitions, float64: normalize in, subtract b_dec if
    asked, encode, activate, decode, normalize out."""
    x = x.double()
    W = {k: v.double() for k, v in w.items()}
    norm = cfg.get("normalize_activations", "none")
    c = torch.ones(len(x), 1, dtype=torch.float64)
    if norm == "constant_norm_rescale":
        c = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
    elif norm == "expected_average_only_in" and "norm_scaling_factor" in cfg:
        c = c * float(cfg["norm_scaling_factor"])  # type: ignore[arg-type]
    sae_in = x * c - (W["b_dec"] if cfg.get("apply_b_dec_to_input") else 0)
    pre = sae_in @ W["W_enc"] + W["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        f = pre.clamp_min(0)
    elif arch == "jumprelu":
        f = torch.where(pre > W["threshold"], pre, 0.0)
    else:
        k = int(cfg["k"])  # type: ignore[call-overload]
        keep = pre >= pre.sort(dim=-1, descending=True).values[:, k - 1 : k]
        f = torch.where(keep, pre.clamp_min(0), 0.0)
    out = f @ W["W_dec"] + W["b_dec"]
    return out / c


CASES = [
    {"architecture": "standard"},
    {"architecture": "standard", "apply_b_dec_to_input": True},
    {"architecture": "jumprelu", "apply_b_dec_to_input": False},
    {"architecture": "jumprelu", "normalize_activations": "constant_norm_rescale"},
    {"architecture": "topk", "k": 5, "apply_b_dec_to_input": True},
    {"architecture": "topk", "k": 3, "normalize_activations": "constant_norm_rescale"},
    {
        "architecture": "standard",
        "apply_b_dec_to_input": True,
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": 0.37,
    },
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_saelens_round_trip_matches_the_definitions(tmp_path: Path, cfg: dict[str, object]) -> None:
    w = write_saelens(tmp_path / "sae", cfg)
    sae = load_sae(tmp_path / "sae")
    assert sae.hook == "blocks.1.hook_resid_post"
    x = torch.randn(16, D_IN, dtype=torch.float64) * 3
    got = sae.decode(sae.encode(x), sae.input_scale(x))
    torch.testing.assert_close(got, reference(x, w, cfg), rtol=1e-5, atol=1e-5)
    # Written again by llm-flow and read back: the same SAE.
    again = load_sae(save_sae(sae, tmp_path / "again"))
    torch.testing.assert_close(again.decode(again.encode(x), again.input_scale(x)), got)


def test_old_saelens_top_level_hook_name(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", {"architecture": "standard", "metadata": None})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["hook_name"] = "blocks.0.hook_resid_pre"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(tmp_path / "sae").hook == "blocks.0.hook_resid_pre"


def test_gemma_scope_npz(tmp_path: Path) -> None:
    w = weights(1)
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in w.items()})
    sae = load_sae(tmp_path / "params.npz", hook="blocks.2.hook_resid_post")
    assert (sae.architecture, sae.hook) == ("jumprelu", "blocks.2.hook_resid_post")
    x = torch.randn(10, D_IN, dtype=torch.float64)
    expected = reference(x, w, {"architecture": "jumprelu"})
    torch.testing.assert_close(sae.decode(sae.encode(x)), expected, rtol=1e-5, atol=1e-5)
    assert load_sae(tmp_path).hook is None  # a folder holding params.npz


def test_bad_inputs_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SaeError, match="no such file"):
        load_sae(tmp_path / "missing")
    with pytest.raises(SaeError, match="holds no SAE"):
        load_sae(tmp_path)
    write_saelens(tmp_path / "sae", {"architecture": "gated"})
    with pytest.raises(SaeError, match="unknown SAE architecture 'gated'"):
        load_sae(tmp_path / "sae")
    write_saelens(tmp_path / "ok", {"architecture": "standard"})
    with pytest.raises(SaeError, match="not on 'blocks.3.hook_resid_post'"):
        load_sae(tmp_path / "ok", hook="blocks.3.hook_resid_post")


def test_offline_hub_load_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache"):
        load_sae("nobody-here/no-such-sae/layer_3")


def test_hooks_and_nodes() -> None:
    assert node_of_hook("blocks.3.hook_resid_post", 5) == "I3_5"
    assert node_of_hook("blocks.3.hook_resid_pre", 5) == "I2_5"
    assert node_of_hook("blocks.0.hook_resid_pre", 1) == "X0_1"
    assert node_of_hook("blocks.2.hook_resid_mid", 0) == "A2_0"
    assert hooks_of_node("I", 2) == ("blocks.2.hook_resid_post", "blocks.3.hook_resid_pre")
    with pytest.raises(SaeError, match="not a residual hook"):
        node_of_hook("blocks.2.attn.hook_z", 0)


def test_find_sae_names_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SaeError, match='"saes": {"blocks.1.hook_resid_post": PATH_OR_REPO}'):
        find_sae((), "tiny", "I", 1)
    write_saelens(tmp_path / "sae", {"architecture": "standard"})
    # Configured as the next layer's input: the same node.
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.2.hook_resid_pre"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    found = find_sae((("blocks.2.hook_resid_pre", str(tmp_path / "sae")),), "tiny", "I", 1)
    assert found.hook == "blocks.2.hook_resid_pre"


def test_locate_sae_prefers_the_config_and_lists_every_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    assert locate_sae((), "tiny", "I", 1) is None and sae_hooks((), "tiny") == ()
    trained = trained_sae_dir("tiny", "blocks.1.hook_resid_post")
    write_saelens(trained, {"architecture": "standard"})
    assert locate_sae((), "tiny", "I", 1) == ("blocks.1.hook_resid_post", str(trained))
    configured = (("blocks.2.hook_resid_pre", "owner/repo"), ("blocks.0.hook_resid_mid", "x"))
    # The config entry wins over the trained SAE, on either hook that reads the node.
    assert locate_sae(configured, "tiny", "I", 1) == ("blocks.2.hook_resid_pre", "owner/repo")
    assert locate_sae(configured, "tiny", "A", 0) == ("blocks.0.hook_resid_mid", "x")
    assert locate_sae(configured, "tiny", "I", 0) is None
    assert sae_hooks(configured, "tiny") == (
        "blocks.0.hook_resid_mid",
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_pre",
    )
    assert sae_hooks((), "other") == ()
