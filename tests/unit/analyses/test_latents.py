"""SAE latents of a residual node: parts sum to the state, contributions to 1, direct effects to
the state's direct logit; ablating a latent moves the residual by exactly its part."""

from __future__ import annotations

import pytest
import torch

from llm_flow.analyses.contrast import contrast_ids
from llm_flow.analyses.latents import (
    ablate_latents,
    decompose,
    latent_hooks,
    latents,
    parse_latents,
)
from llm_flow.analyses.lens import residual_vector
from llm_flow.engine.trace import Trace, trace
from llm_flow.errors import SaeError
from llm_flow.models.sae import Sae
from tests.tiny import prompt, tiny_llm

D_SAE = 40


def random_sae(hook: str, d_in: int = 32, seed: int = 0, **kw: object) -> Sae:
    """A random standard SAE whose positive encoder bias keeps many latents active."""
    gen = torch.Generator().manual_seed(seed)
    return Sae(
        hook=hook,
        architecture=kw.pop("architecture", "standard"),  # type: ignore[arg-type]
        W_enc=torch.randn(d_in, D_SAE, generator=gen) * 0.3,
        b_enc=torch.rand(D_SAE, generator=gen),
        W_dec=torch.randn(D_SAE, d_in, generator=gen) * 0.01,
        b_dec=torch.randn(d_in, generator=gen) * 0.01,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2-bias"])
def tr(request: pytest.FixtureRequest) -> Trace:
    return trace(tiny_llm(request.param), prompt(6))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"apply_b_dec_to_input": True, "normalize_activations": "constant_norm_rescale"},
        {"architecture": "topk", "k": 7},
    ],
)
def test_parts_sum_to_the_state_and_contributions_to_one(tr: Trace, kw: dict[str, object]) -> None:
    sae = random_sae("blocks.1.hook_resid_post", **kw)
    x = residual_vector(tr.run, "I1_3")
    active, acts, parts = decompose(sae, x)
    assert len(active) == len(acts) == len(parts) - 2 > 3
    torch.testing.assert_close(parts.sum(0), x.double(), rtol=0, atol=1e-9)
    result = latents(tr, "I1_3", sae, top=D_SAE)
    total = result.latents_contribution + result.b_dec_contribution + result.error_contribution
    assert total == pytest.approx(1, abs=1e-9)
    assert sum(latent.contribution for latent in result.latents) == pytest.approx(
        result.latents_contribution, abs=1e-9
    )
    assert result.l0 == len(active) == len(result.latents)
    contributions = [latent.contribution for latent in result.latents]
    assert contributions == sorted(contributions, reverse=True)
    # Direct effects: linear through the frozen final norm, so they add up to the state's.
    pred = tr.prediction(3).id
    whole = tr.llm.final_norm_linear(x, tr.run.final_scale[3]) @ tr.llm.W_U[:, pred]
    parts_sum = (
        sum(latent.direct_effect for latent in result.latents)
        + result.b_dec_direct_effect
        + result.error_direct_effect
    )
    assert parts_sum == pytest.approx(float(whole), rel=1e-4, abs=1e-4)


def test_json_contract_and_contrast(tr: Trace) -> None:
    sae = random_sae("blocks.2.hook_resid_pre")  # reads I1 too
    result = latents(tr, "I1_2", sae, top=3, target=" w1", distractor=" w2")
    data = result.to_json()
    assert {"node", "hook", "latents", "b_dec_contribution", "error_contribution"} <= set(data)
    assert data["hook"] == "blocks.2.hook_resid_pre" and len(data["latents"]) == 3
    first = data["latents"][0]
    assert {"index", "activation", "contribution", "direct_effect", "direct_effect_diff"} <= set(
        first
    )
    assert len(first["promoted"]) == len(first["suppressed"]) == 5
    # On target − distractor too, b_dec and the error included, the parts add up to the state's.
    everything = latents(tr, "I1_2", sae, top=D_SAE, target=" w1", distractor=" w2")
    assert everything.b_dec_direct_effect_diff is not None
    assert everything.error_direct_effect_diff is not None
    ids = contrast_ids(tr.llm, " w1", " w2")
    unembed = tr.llm.W_U[:, ids[0]] - tr.llm.W_U[:, ids[1]]
    x = residual_vector(tr.run, "I1_2")
    whole = float(tr.llm.final_norm_linear(x, tr.run.final_scale[2]) @ unembed)
    parts_sum = (
        sum(latent.direct_effect_diff or 0.0 for latent in everything.latents)
        + everything.b_dec_direct_effect_diff
        + everything.error_direct_effect_diff
    )
    assert parts_sum == pytest.approx(whole, rel=1e-4, abs=1e-4)
    assert {"b_dec_direct_effect_diff", "error_direct_effect_diff"} <= set(everything.to_json())
    assert "b_dec_direct_effect_diff" not in latents(tr, "I1_2", sae).to_json()


def test_wrong_node_or_hook_is_refused(tr: Trace) -> None:
    sae = random_sae("blocks.1.hook_resid_post")
    with pytest.raises(SaeError, match="not node I0_1"):
        latents(tr, "I0_1", sae)
    with pytest.raises(SaeError, match="target and a distractor go together"):
        latents(tr, "I1_1", sae, target=" w1")
    with pytest.raises(SaeError, match="expected HOOK:I"):
        parse_latents("blocks.1.hook_resid_post")
    assert parse_latents("blocks.1.hook_resid_post:3,4") == ("blocks.1.hook_resid_post", (3, 4))
    with pytest.raises(SaeError, match="latent indices must be in"):
        latent_hooks(tr.llm, sae, [D_SAE], 0.0)


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_ablating_a_latent_moves_the_residual_by_its_part(tr: Trace, scale: float) -> None:
    sae = random_sae("blocks.0.hook_resid_post")
    x = tr.run.layers[0].resid_post.float()  # [T, D] read by layer 1
    picked = [int(sae.encode(x[2]).nonzero()[0])]
    after = tr.llm.run(tr.prompt, fwd_hooks=latent_hooks(tr.llm, sae, picked, scale))
    moved = after.layers[1].resid_pre.double() - x.double()
    acts = sae.encode(x.double())[:, picked]
    part = acts @ sae.W_dec.double()[picked]
    torch.testing.assert_close(moved, (scale - 1) * part, rtol=0, atol=1e-5)


def test_latent_ablation_route_diff(tr: Trace) -> None:
    sae = random_sae("blocks.0.hook_resid_post")
    result = ablate_latents(tr, sae, [0, 1, 2], traced=True)
    # The traced run's self-checks all held; layer 0's edges are the same, later ones moved.
    diff = result.route_diff(threshold=0.0).to_dict()
    moved = {e["target"] for e in diff["edges"] if abs(e["change"]) > 1e-6}
    assert moved and not any(t.startswith(("A0_", "M0_", "I0_")) for t in moved)
    with pytest.raises(SaeError, match="cannot be ablated"):
        latent_hooks(tr.llm, random_sae("blocks.2.hook_resid_post"), [0], 0.0)
