"""Tests for llm_flow/analyses/contrast.py: target vs distractor, direct effects, act × grad
attributions, the route's effect table, and ``llm-flow graph --target/--distractor``.

Invariants on tiny random models of every architecture family: the direct effects of all parts
at the output position sum to the final residual's logit difference (and, with the constant, to
the model's), per-head and per-neuron direct effects agree with the logit lens's independent
head/neuron updates, and attributions agree with finite differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_flow.analyses.attribution import attribute
from llm_flow.analyses.contrast import (
    EFFECT_COLUMNS,
    ContrastError,
    analyse_contrast,
    contrast,
    contrast_ids,
    direct_effects,
    single_token,
)
from llm_flow.analyses.lens import direct_logits, expert_update, head_update, neuron_update
from llm_flow.engine.routes import find_route
from llm_flow.engine.trace import Trace, trace
from llm_flow.models.base import ModelRun
from llm_flow.models.bridge import BridgeLlm
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import ARCHS, prompt, tiny_llm

TARGET, DISTRACTOR = "w3", "w7"


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> Trace:
    return trace(tiny_llm(request.param), prompt(6))


def lens_diff(tr: Trace, update: torch.Tensor, p: int, a: int, b: int) -> float:
    logits = direct_logits(tr, update, p)
    return float(logits[a] - logits[b])


# -- tokens -----------------------------------------------------------------------------------


def test_single_token_gives_the_vocabulary_id(model: Trace) -> None:
    llm = model.llm
    assert single_token(llm, "w3") == llm.tokenize_unchecked("w3")[-1]


def test_multi_token_target_says_how_it_tokenizes(model: Trace) -> None:
    llm = model.llm
    with pytest.raises(ContrastError, match=r"'w3 w4' is 2 tokens .*\['w3', 'w4'\]"):
        single_token(llm, "w3 w4", "target")


def test_same_or_empty_tokens_are_refused(model: Trace) -> None:
    llm = model.llm
    with pytest.raises(ContrastError, match="same token"):
        contrast_ids(llm, "w3", "w3")
    with pytest.raises(ContrastError, match="distractor is empty"):
        contrast_ids(llm, "w3", "")


@pytest.mark.parametrize("position", [-1, 2])
def test_contrast_reads_the_run_logits(model: Trace, position: int) -> None:
    tr = model
    run = tr.run
    c = contrast(tr, TARGET, DISTRACTOR, position)
    p = position % run.n_tokens
    assert c.position == p
    assert c.target_logit == pytest.approx(float(run.logits[p, c.target_id]))
    assert c.logit_diff == pytest.approx(
        float(run.logits[p, c.target_id] - run.logits[p, c.distractor_id])
    )
    assert set(c.to_dict()) >= {"target", "distractor", "logit_diff"}


# -- direct effects ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", [-1, 3])
def test_direct_effects_of_all_parts_sum_to_the_logit_difference(
    model: Trace, position: int
) -> None:
    tr = model
    run = tr.run
    c = contrast(tr, TARGET, DISTRACTOR, position)
    d = direct_effects(tr, c)
    last = run.layers[-1].resid_post[c.position]
    # The final residual through the frozen-scale map, computed by the logit lens.
    want_total = lens_diff(tr, last, c.position, c.target_id, c.distractor_id)
    scale = max(1.0, abs(want_total))
    assert d.total == pytest.approx(want_total, abs=1e-4 * scale)
    # embedding + Σ heads per source + biases + Σ neurons = final residual (parallel blocks too).
    assert d.parts_sum() == pytest.approx(d.total, abs=1e-4 * scale)
    # Adding the final norm's bias and b_U gives the model's own logit difference.
    assert d.total + d.constant == pytest.approx(c.logit_diff, abs=1e-4 * scale)
    assert d.heads.shape == (run.n_layers, run.n_tokens, run.layers[0].values.shape[1])
    # Sources after the output position have no part at all.
    assert torch.all(d.heads[:, c.position + 1 :] == 0)


def test_head_and_neuron_direct_effects_match_the_lens_updates(
    model: Trace,
) -> None:
    tr = model
    run = tr.run
    c = contrast(tr, TARGET, DISTRACTOR)
    d = direct_effects(tr, c)
    p, a, b = c.position, c.target_id, c.distractor_id
    for layer in range(run.n_layers):
        for head in (0, 3):
            want = lens_diff(tr, head_update(run, layer, head, p), p, a, b)
            assert float(d.heads[layer, :, head].sum()) == pytest.approx(want, abs=1e-5)
        if run.layers[layer].experts is None:
            for neuron in (0, 17):
                want = lens_diff(tr, neuron_update(run, layer, neuron, p), p, a, b)
                assert float(d.neurons[layer, neuron]) == pytest.approx(want, abs=1e-5)
        else:
            assert torch.all(d.neurons[layer] == 0)
            for expert in [*range(tr.llm.info.n_experts), None]:
                want = lens_diff(tr, expert_update(run, layer, expert, p), p, a, b)
                got = d.experts[layer, -1 if expert is None else expert]
                assert float(got) == pytest.approx(want, abs=1e-5)
        whole_ffn = lens_diff(tr, run.layers[layer].mlp_update[p].float(), p, a, b)
        assert float(d.ffn[layer]) == pytest.approx(whole_ffn, abs=1e-4)


def test_direct_effects_recompute_dropped_patterns() -> None:
    llm = tiny_llm("llama-gqa")
    kept, dropped = trace(llm, prompt(5)), trace(llm, prompt(5), keep_patterns=False)
    assert all(layer.pattern is None for layer in dropped.run.layers)
    want = direct_effects(kept, contrast(kept, TARGET, DISTRACTOR))
    got = direct_effects(dropped, contrast(dropped, TARGET, DISTRACTOR))
    torch.testing.assert_close(
        got.heads, want.heads, rtol=0, atol=0
    )  # the same pattern, bit for bit
    torch.testing.assert_close(got.neurons, want.neurons, rtol=0, atol=0)


# -- attributions -----------------------------------------------------------------------------


def ld_with_scaled(
    llm: BridgeLlm, run: ModelRun, name: str, index: tuple[int, ...], factor: float, a: int, b: int
) -> float:
    """LD at the last position with one activation entry multiplied by ``factor``."""

    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        out = tensor.clone()
        out[(0, *index)] *= factor
        return out

    logits = llm.logits_with_hooks(run.token_ids, [(name, hook)])
    return float(logits[-1, a] - logits[-1, b])


def test_attribution_is_activation_times_gradient(model: Trace) -> None:
    """act · ∂LD/∂act = d LD(act · (1 + ε)) / dε at 0: checked by central differences on the
    head value and the neuron with the largest attribution."""
    tr = model
    llm, run = tr.llm, tr.run
    c = contrast(tr, TARGET, DISTRACTOR)
    attr = attribute(tr, c)
    assert attr.logit_diff == pytest.approx(c.logit_diff, abs=1e-5)
    eps = 1e-2
    layer, t, h = torch.unravel_index(attr.head_values.abs().argmax(), attr.head_values.shape)
    name, index = f"blocks.{int(layer)}.attn.hook_z", (int(t), int(h))
    args = (c.target_id, c.distractor_id)
    fd = (
        ld_with_scaled(llm, run, name, index, 1 + eps, *args)
        - ld_with_scaled(llm, run, name, index, 1 - eps, *args)
    ) / (2 * eps)
    want = float(attr.head_values[layer, t, h])
    assert fd == pytest.approx(want, rel=0.03, abs=1e-6)
    if llm.info.moe_layers:  # the routed expert with the largest attribution: its router weight
        routed = attr.experts[..., :-1]
        layer, t, n = torch.unravel_index(routed.abs().argmax(), routed.shape)
        name, want = llm.hook_name("experts", int(layer)), float(routed[layer, t, n])
    else:
        layer, t, n = torch.unravel_index(attr.neurons.abs().argmax(), attr.neurons.shape)
        name, want = llm.hook_name("neurons", int(layer)), float(attr.neurons[layer, t, n])
    index = (int(t), int(n))
    fd = (
        ld_with_scaled(llm, run, name, index, 1 + eps, *args)
        - ld_with_scaled(llm, run, name, index, 1 - eps, *args)
    ) / (2 * eps)
    assert fd == pytest.approx(want, rel=0.03, abs=1e-6)


def test_head_attribution_splits_exactly_over_sources(model: Trace) -> None:
    tr = model
    run = tr.run
    attr = attribute(tr, contrast(tr, TARGET, DISTRACTOR))
    for layer in range(run.n_layers):
        per_source = attr.heads(run, layer)  # [T, S, H]
        assert torch.allclose(per_source.sum(1), attr.head_values[layer], atol=1e-6)
        # Causal: a query never takes from a later source.
        later = torch.ones(run.n_tokens, run.n_tokens, dtype=torch.bool).triu(1)
        assert torch.all(per_source[later] == 0)


def test_neither_attribute_nor_direct_effects_change_the_model() -> None:
    llm = tiny_llm("llama-gqa")
    before = {k: v.clone() for k, v in llm._bridge.state_dict().items()}
    tr = trace(llm, prompt(5))
    run = tr.run
    analyse_contrast(tr, find_route(tr.graph, [-1], 0.0), TARGET, DISTRACTOR)
    assert all(p.grad is None for p in llm._bridge.parameters())
    after = llm._bridge.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(llm.run(prompt(5)).logits, run.logits)


# -- the route's effect table -----------------------------------------------------------------


@pytest.fixture(scope="module")
def analysis() -> Any:
    llm = tiny_llm("gemma3-postnorm")
    tr = trace(llm, prompt(6))
    route = find_route(tr.graph, [-1], 0.0, renormalize=False)  # every stored edge
    return tr.run, route, analyse_contrast(tr, route, TARGET, DISTRACTOR, neurons_per_block=3)


def test_effect_table_covers_every_head_on_every_route_edge(analysis: Any) -> None:
    run, route, result = analysis
    frame = result.frame()
    assert tuple(frame.columns) == EFFECT_COLUMNS
    heads = frame[frame["kind"] == "head"]
    n_heads = run.layers[0].values.shape[1]
    assert len(heads) == len(route.attention_idx) * n_heads
    assert set(frame["kind"]) == {"head", "ffn", "neuron"}
    assert len(frame[frame["kind"] == "ffn"]) == int(route.ffn.sum())
    assert len(frame[frame["kind"] == "neuron"]) == 3 * int(route.ffn.sum())
    # Sortable by every numeric column, nullable ints where a row has no head/neuron.
    assert str(frame["head"].dtype) == "Int64" and str(frame["neuron"].dtype) == "Int64"
    assert frame.sort_values("attribution").iloc[0]["attribution"] == frame["attribution"].min()


def test_only_parts_at_the_output_position_have_direct_effects(analysis: Any) -> None:
    run, _, result = analysis
    p = result.contrast.position
    for row in result.rows:
        if row.target != p:
            assert row.direct_effect == 0.0
    at_p = [r for r in result.rows if r.kind == "head" and r.target == p]
    got = torch.tensor([r.direct_effect for r in at_p])
    want = torch.stack([result.direct.heads[r.layer, r.source, r.head] for r in at_p])
    assert torch.allclose(got, want)
    ffn_rows = {r.layer: r.direct_effect for r in result.rows if r.kind == "ffn" and r.target == p}
    assert ffn_rows and all(
        v == pytest.approx(float(result.direct.ffn[layer])) for layer, v in ffn_rows.items()
    )
    # The head rows at p with the route's full graph are all of the direct effect of the heads.
    assert float(got.sum()) == pytest.approx(float(result.direct.heads.sum()), abs=1e-5)


def test_head_rows_carry_per_head_attribution_and_node_ids(analysis: Any) -> None:
    run, _, result = analysis
    row = next(r for r in result.rows if r.kind == "head" and r.target != r.source)
    want = result.attributions.heads(run, row.layer)[row.target, row.source, row.head]
    assert row.attribution == pytest.approx(float(want))
    assert row.node == f"A{row.layer}_{row.target}"
    neuron = next(r for r in result.rows if r.kind == "neuron")
    assert neuron.node == f"M{neuron.layer}_{neuron.target}" and neuron.weight is None


# -- CLI: graph --target / --distractor -------------------------------------------------------


@pytest.fixture(scope="module")
def config_file(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("contrast-cli")
    path = folder / "config.json"
    config = {"models": {"tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))}}}
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


cli = run_cli


def test_graph_with_target_adds_contrast_and_direct_effects(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    text = prompt(6)
    code, out, err = cli(
        capsys,
        "graph",
        "--config",
        str(config_file),
        "--prompt",
        text,
        "--threshold",
        "0",
        "--no-renormalize",
        "--target",
        TARGET,
        "--distractor",
        DISTRACTOR,
    )
    assert (code, err) == (0, "")
    data = json.loads(out)
    llm = tiny_llm("llama-gqa")  # the saved model is seed 0 of the same architecture
    tr = trace(llm, text)
    c = contrast(tr, TARGET, DISTRACTOR)
    assert data["contrast"]["target"] == TARGET and data["contrast"]["distractor"] == DISTRACTOR
    assert data["contrast"]["logit_diff"] == pytest.approx(c.logit_diff, abs=1e-5)
    d = direct_effects(tr, c)
    p = data["position"]
    attn_total = 0.0
    for edge in data["edges"]:
        if edge["kind"] == "residual":
            assert "direct_effect" not in edge
            continue
        assert isinstance(edge["direct_effect"], float)
        at_output = edge["target"].endswith(f"_{p}")
        if not at_output:
            assert edge["direct_effect"] == 0.0
        if edge["kind"] == "attention":
            per_head = edge["head_direct_effects"]
            assert len(per_head) == 4
            assert sum(per_head.values()) == pytest.approx(edge["direct_effect"], abs=1e-6)
            attn_total += edge["direct_effect"]
    # The full graph has every attention edge into A{l}_p: together, every head's direct effect.
    assert attn_total == pytest.approx(float(d.heads.sum()), abs=1e-4)
    # Everything else of the contract is unchanged.
    plain = cli(
        capsys,
        "graph",
        "--config",
        str(config_file),
        "--prompt",
        text,
        "--threshold",
        "0",
        "--no-renormalize",
    )
    base = json.loads(plain[1])
    assert set(data) - set(base) == {"contrast"}
    assert [(e["source"], e["target"], e["weight"]) for e in base["edges"]] == [
        (e["source"], e["target"], e["weight"]) for e in data["edges"]
    ]


def test_graphml_keeps_contrast_and_direct_effects(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    import networkx as nx

    code, out, err = cli(
        capsys,
        "graph",
        "--config",
        str(config_file),
        "--prompt",
        prompt(5),
        "--threshold",
        "0.01",
        "--target",
        TARGET,
        "--distractor",
        DISTRACTOR,
        "--format",
        "graphml",
    )
    assert (code, err) == (0, "")
    g = nx.parse_graphml(out, force_multigraph=True)
    assert isinstance(g.graph["contrast_logit_diff"], float)
    kinds = {(d["kind"], "direct_effect" in d) for _, _, d in g.edges(data=True)}
    assert kinds == {("attention", True), ("ffn", True), ("residual", False)}


def test_analysis_defaults_to_the_route_position() -> None:
    llm = tiny_llm("llama-gqa")
    tr = trace(llm, prompt(6))
    result = analyse_contrast(tr, find_route(tr.graph, [3], 0.0), TARGET, DISTRACTOR)
    assert result.contrast.position == result.direct.position == result.attributions.position == 3


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--target", "w3"), "--target and --distractor go together"),
        (("--target", "w3 w4", "--distractor", "w5"), "is 2 tokens"),
        (("--target", "w3", "--distractor", "w3"), "same token"),
    ],
)
def test_graph_contrast_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], config_file: Path, extra: tuple[str, ...], needle: str
) -> None:
    code, out, err = cli(
        capsys, "graph", "--config", str(config_file), "--prompt", prompt(4), *extra
    )
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("llm-flow: error: ")
    assert needle in err


def test_moe_effect_rows_are_the_routed_and_shared_experts_of_each_block() -> None:
    tr = trace(tiny_llm("qwen2-moe"), prompt(6, seed=2))
    route = find_route(tr.graph, [-1], 0.0)
    analysis = analyse_contrast(tr, route, TARGET, DISTRACTOR)
    rows = [r for r in analysis.rows if r.kind in ("expert", "shared_expert")]
    p = analysis.direct.position
    for layer, t in route.ffn.nonzero().tolist():
        ex = tr.run.layers[layer].experts
        assert ex is not None
        at = [r for r in rows if (r.layer, r.target) == (layer, t)]
        assert sorted(r.expert for r in at if r.kind == "expert") == sorted(ex.index[t].tolist())
        assert sum(r.kind == "shared_expert" for r in at) == 1
        # The block's direct effect and attribution are exactly its experts' (no bias here).
        block = next(r for r in analysis.rows if (r.kind, r.layer, r.target) == ("ffn", layer, t))
        assert block.direct_effect == pytest.approx(sum(r.direct_effect for r in at), abs=1e-6)
        assert block.attribution == pytest.approx(sum(r.attribution for r in at), abs=1e-6)
        if t != p:
            assert all(r.direct_effect == 0 for r in at)
    assert analysis.frame()["expert"].notna().sum() == sum(r.kind == "expert" for r in rows)
