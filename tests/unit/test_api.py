"""Tests for llm_flow/api.py, the Python API contract (docs/architecture.md, "The contracts
others rely on"), on tiny random models of every architecture family.

The API is the engine and the analyses behind a few names, so these tests check that it hands
back exactly what the lower layers (and the CLI) give, not the numbers themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import plotly.graph_objects as go
import pytest
import torch

import llm_flow as lf
from llm_flow.analyses.ablation import ablated_logits
from llm_flow.analyses.interventions import Ablation, HeadRef
from llm_flow.engine import routes, trace
from llm_flow.errors import ContrastError, InputError, PositionError
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny, f32_tol
from tests.tiny import ARCHS, prompt, tiny_hf_model, tiny_tokenizer

TEXT = prompt(6)


@pytest.fixture(scope="module", params=ARCHS)
def tr(request: pytest.FixtureRequest) -> lf.Trace:
    model = lf.from_hf(tiny_hf_model(request.param), tiny_tokenizer())
    return lf.trace(model, TEXT)


def test_trace_is_the_engine_trace(tr: lf.Trace) -> None:
    plain = trace.trace(tr.llm, TEXT)
    assert isinstance(tr, trace.Trace)
    assert tr.tokens == plain.tokens and tr.token_ids == plain.token_ids
    assert torch.equal(tr.graph.attn_offsets, plain.graph.attn_offsets)
    # Two passes of one model need not agree bit for bit: with one thread, torch's CPU kernels
    # gave layer 0 activations that differed in the last bit between passes (measured).
    tol = {"atol": f32_tol(terms=3 * 128), "rtol": 0}
    torch.testing.assert_close(tr.graph.attn_weights, plain.graph.attn_weights, **tol)
    scale = float(plain.run.logits.abs().max())
    torch.testing.assert_close(tr.run.logits, plain.run.logits, atol=scale * tol["atol"], rtol=0)
    token, token_id, prob = tr.prediction()
    assert (
        token_id == int(tr.run.logits[-1].argmax()) and token == tr.llm.token_strings([token_id])[0]
    )
    assert 0 < prob <= 1
    with pytest.raises(PositionError):
        tr.prediction(tr.n_tokens)


def test_route_is_find_route_and_knows_its_trace(tr: lf.Trace) -> None:
    route = tr.route(threshold=0.05, position=-2, renormalize=False)
    want = routes.find_route(tr.graph, [tr.n_tokens - 2], 0.05, renormalize=False)
    assert isinstance(route, routes.Route) and route.trace is tr
    assert route.position == tr.n_tokens - 2 and route.positions == want.positions
    names = ("attention_idx", "attention_weights", "attn_residual", "ffn", "ffn_residual")
    for name in (*names, "after_layer"):
        assert torch.equal(getattr(route, name), getattr(want, name)), name
    assert torch.equal(route.attn_factor, want.attn_factor)


def test_to_json_networkx_and_graphml_agree(tr: lf.Trace) -> None:
    route = tr.route()
    data = route.to_json(heads=True)
    assert json.loads(json.dumps(data)) == data
    assert data["position"] == tr.n_tokens - 1 and data["tokens"] == list(tr.tokens)
    assert data["prediction"] == dict(zip(("token", "id", "prob"), tr.prediction(), strict=True))
    assert all("heads" in e for e in data["edges"] if e["kind"] == "attention")
    g = route.to_networkx()
    assert isinstance(g, nx.MultiDiGraph)
    assert g.number_of_nodes() == len(data["nodes"]) and g.number_of_edges() == len(data["edges"])
    assert "<graphml" in route.to_graphml()


def test_figure_draws_the_route(tr: lf.Trace) -> None:
    route = tr.route(threshold=0.0)
    fig = route.figure()
    assert isinstance(fig, go.Figure)
    hover = " ".join(str(t.hovertext) for t in fig.data if t.hovertext is not None)
    layer, t, s = route.attention_idx[0].tolist()
    edge = f"{'X0' if layer == 0 else f'I{layer - 1}'}_{s} → A{layer}_{t}"
    assert edge in hover  # every route edge can be hovered
    selected = route.figure(selected=f"M{tr.n_layers - 1}_{tr.n_tokens - 1}")
    assert len(selected.data) > len(fig.data)  # the selection ring is drawn


def test_full_graph_is_every_stored_edge(tr: lf.Trace) -> None:
    full = tr.full_graph()
    assert len(full.attention_idx) == len(tr.graph.attn_weights)
    every = lf.trace(tr.llm, TEXT, attention_floor=0.0).full_graph()  # a floor of 0 stores all
    n = tr.n_tokens
    assert len(every.attention_idx) == tr.n_layers * n * (n + 1) // 2
    assert full.threshold == 0.0 and full.renormalize is False


def test_contrast_is_the_analysis_of_the_route(tr: lf.Trace) -> None:
    analysis = tr.contrast("w3", "w7", threshold=0.0)
    assert analysis.contrast.position == tr.n_tokens - 1
    want = float(
        tr.run.logits[-1, analysis.contrast.target_id]
        - tr.run.logits[-1, analysis.contrast.distractor_id]
    )
    assert analysis.contrast.logit_diff == pytest.approx(want, abs=1e-5)
    assert len(analysis.frame()) == len(analysis.rows) > 0
    with pytest.raises(ContrastError, match="same token"):
        tr.contrast("w3", "w3")
    data = tr.route(threshold=0.0).to_json(contrast=analysis)
    assert data["contrast"]["logit_diff"] == analysis.contrast.logit_diff
    assert all("direct_effect" in e for e in data["edges"] if e["kind"] != "residual")


def test_lens_reproduces_the_prediction(tr: lf.Trace) -> None:
    top = tr.lens(f"I{tr.n_layers - 1}_{tr.n_tokens - 1}", k=1)[0]
    assert top.token_id == tr.prediction().id


def test_ablate_is_the_core_ablation(tr: lf.Trace) -> None:
    result = lf.ablate(tr, heads="1.2", target="w3", distractor="w7", k=3)
    want = ablated_logits(tr.llm, tr.token_ids, Ablation(heads=(HeadRef(1, 2),)))[-1]
    assert result.after.top[0].id == int(want.argmax())
    assert result.before.top[0].id == tr.prediction().id and len(result.after.top) == 3
    assert result.after.logit_diff is not None and result.before.logit_diff is not None
    assert result.after.logit_diff != pytest.approx(result.before.logit_diff, abs=1e-6)
    with pytest.raises(InputError, match="route"):
        result.route_diff(0.04)  # not traced
    pairs = lf.ablate(tr, heads=[(1, 2)], target="w3", distractor="w7", k=3)
    assert pairs.to_dict() == result.to_dict()  # (layer, head) pairs mean the same heads
    traced = lf.ablate(tr, heads="1.2", traced=True)
    diff = traced.route_diff()  # τ = 0.04 by default
    assert diff.before.threshold == 0.04
    assert diff.before.graph is tr.graph and diff.after.graph is not tr.graph
    with pytest.raises(InputError, match="needs a target"):
        lf.ablate(tr, heads="1.2", distractor="w7")


def test_mean_ablation_needs_and_uses_means(tr: lf.Trace) -> None:
    means = lf.mean_activations(tr.llm, [prompt(5, seed=s) for s in (1, 2)])
    assert means.n_prompts == 2
    zero = lf.ablate(tr, heads="0.1", mode="zero")
    mean = lf.ablate(tr, heads="0.1", mode="mean", means=means)
    assert mean.means_source is not None
    assert [t.prob for t in zero.after.top] != [t.prob for t in mean.after.top]
    with pytest.raises(InputError, match="mean activations"):
        lf.ablate(tr, heads="0.1", mode="mean")


def test_experts_are_ablated_from_strings_or_pairs() -> None:
    moe = lf.trace(lf.from_hf(tiny_hf_model("qwen2-moe"), tiny_tokenizer()), prompt(6))
    as_text = lf.ablate(moe, experts="0.1,2.3")
    as_pairs = lf.ablate(moe, experts=[(0, 1), (2, 3)])
    assert [str(e) for e in as_pairs.ablation.experts] == ["0.1", "2.3"]
    assert as_text.after.top == as_pairs.after.top
    assert [t.prob for t in as_text.after.top] != [t.prob for t in as_text.before.top]
    with pytest.raises(InputError, match="no dense neurons"):
        lf.ablate(moe, neurons="0.3")


def test_faithfulness_takes_the_trace(tr: lf.Trace) -> None:
    every = lf.trace(tr.llm, TEXT, attention_floor=0.0)  # every edge stored
    report = lf.faithfulness(every, threshold=0.0, mode="zero", seeds=[0])
    assert report.route.share == pytest.approx(1.0, abs=1e-4)  # τ = 0: the route is everything


def test_route_json_is_the_cli_json(
    capsys: pytest.CaptureFixture[str], saved_tiny: SavedTiny, tmp_path: Path
) -> None:
    folder = saved_tiny("gemma3-postnorm")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": {"tiny": {"source": "local", "path": str(folder)}}}))
    capsys.readouterr()  # saving the model printed progress
    code, out, err = run_cli(capsys, "graph", "--config", str(config), "--prompt", TEXT, "--heads")
    assert (code, err) == (0, "")
    model = lf.load(config=config)
    assert json.loads(out) == lf.trace(model, TEXT).route().to_json(heads=True)


def test_import_is_lazy_and_names_resolve() -> None:
    code = (
        "import sys, llm_flow as lf; heavy = 'torch' in sys.modules; "
        "assert callable(lf.trace) and lf.Route.__name__ == 'Route'; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # `import llm_flow` alone pulls in no torch
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lf.nope  # noqa: B018
