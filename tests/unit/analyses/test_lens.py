"""Tests for llm_flow/analyses/lens.py: logit lens, block/head/neuron updates, promoted and
suppressed tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from llm_flow.analyses.lens import (
    TokenScore,
    block_update,
    direct_logits,
    expert_update,
    head_update,
    logit_lens,
    neuron_update,
    previous_node,
    promoted_suppressed,
    residual_vector,
    update_between,
)
from llm_flow.engine.trace import Trace, predictions_of, trace
from llm_flow.errors import LensError, LlmFlowError
from llm_flow.models.base import Hook, HookSite, LayerRun, ModelInfo, ModelRun, TransparentLlm
from tests.conftest import f32_tol
from tests.graphs import dense_graph
from tests.tiny import ARCHS, VOCAB, prompt, tiny_llm

# Relative to the largest entry, as in test_bridge: float32 sums of ≤ 128 terms (d_mlp, or the
# unembedding's D) whose absolute values add up to a few times the whole (worst case, 4.6e-5).
RTOL = f32_tol(terms=3 * 128)


def rel_err(got: Tensor, want: Tensor) -> float:
    want64 = want.double()
    return float((got.double() - want64).abs().max() / want64.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> Trace:
    return trace(tiny_llm(request.param), prompt(5))


# -- logit lens on real (tiny) models -----------------------------------------------------------


@pytest.mark.parametrize("t", [0, 3, 5])
def test_lens_of_last_residual_reproduces_model_prediction(model: Trace, t: int) -> None:
    tr = model
    llm, run = tr.llm, tr.run
    scores = logit_lens(tr, f"I{run.n_layers - 1}_{t}", k=5)
    want = run.logits[t].topk(5)
    assert [s.token_id for s in scores] == want.indices.tolist()
    logit_tol = RTOL * float(run.logits[t].abs().max())  # the lens recomputes norm + unembed
    got = torch.tensor([s.logit for s in scores])
    assert torch.allclose(got, want.values, rtol=0, atol=logit_tol)
    # Probabilities ≤ 1: logits off by δ move them by ≤ 2δ, plus two float32 softmaxes.
    probs = run.logits[t].softmax(-1)[want.indices]
    prob_tol = 2 * logit_tol + f32_tol(terms=VOCAB + 1)
    assert torch.allclose(torch.tensor([s.prob for s in scores]), probs, rtol=0, atol=prob_tol)
    assert [s.token for s in scores] == llm.token_strings(want.indices.tolist())
    assert all(isinstance(s.rank_change, int) for s in scores)


def test_lens_without_norm_is_raw_unembedding(model: Trace) -> None:
    tr = model
    llm, run = tr.llm, tr.run
    resid = run.layers[1].resid_post[2].float()
    raw = resid @ llm.W_U + llm.b_U
    want = raw.topk(4)
    scores = logit_lens(tr, "I1_2", normalize=False, k=4)
    assert [s.token_id for s in scores] == want.indices.tolist()
    tol = RTOL * float(raw.abs().max())
    assert torch.allclose(torch.tensor([s.logit for s in scores]), want.values, rtol=0, atol=tol)
    normed = logit_lens(tr, "I1_2", normalize=True, k=4)
    assert [s.logit for s in normed] != [s.logit for s in scores]


def test_rank_change_matches_independent_ranking(model: Trace) -> None:
    tr = model
    llm, run = tr.llm, tr.run
    node, prev = "A2_4", "I1_4"
    assert previous_node(node, run.n_layers) == prev
    scores = logit_lens(tr, node, k=VOCAB)
    cur_logits = llm.unembed(residual_vector(run, node)).float()
    prev_logits = llm.unembed(residual_vector(run, prev)).float()
    # Rank by position in a descending argsort (no ties in random float logits).
    cur_rank = cur_logits.argsort(descending=True).argsort()
    prev_rank = prev_logits.argsort(descending=True).argsort()
    assert len(scores) == VOCAB
    for s in scores:
        assert s.rank_change == int(prev_rank[s.token_id] - cur_rank[s.token_id])
    assert sum(s.rank_change or 0 for s in scores) == 0  # a permutation of the same vocab
    assert any(s.rank_change != 0 for s in scores)


def test_lens_of_embedding_has_no_rank_change(model: Trace) -> None:
    tr = model
    scores = logit_lens(tr, "X0_1", k=3)
    assert len(scores) == 3
    assert all(s.rank_change is None and s.prob is not None for s in scores)


# -- residual nodes and updates ----------------------------------------------------------------


def test_residual_nodes_are_chained_by_updates(model: Trace) -> None:
    run = model.run
    t = 3
    assert update_between(run, f"X0_{t}") is None
    assert torch.equal(residual_vector(run, f"X0_{t}"), run.layers[0].resid_pre[t].float())
    for layer in range(run.n_layers):
        for node in (f"A{layer}_{t}", f"I{layer}_{t}"):
            prev = previous_node(node, run.n_layers)
            assert prev is not None
            update = update_between(run, node)
            assert update is not None
            rebuilt = residual_vector(run, prev) + update
            assert rel_err(rebuilt, residual_vector(run, node)) < RTOL
    assert torch.equal(residual_vector(run, f"I2_{t}"), run.layers[2].resid_post[t].float())


def test_heads_plus_bias_reproduce_attention_update_and_its_logits(
    model: Trace,
) -> None:
    tr = model
    llm, run = tr.llm, tr.run
    t = 4
    for layer in range(run.n_layers):
        lr = run.layers[layer]
        n_heads = lr.W_O.shape[0]
        heads = torch.stack([head_update(run, layer, h, t) for h in range(n_heads)])  # [H, D]
        bias = lr.b_O.float() * lr.attn_scale[t].float()  # [D]
        whole = block_update(run, layer, "attention", t)
        assert rel_err(heads.sum(0) + bias, whole) < RTOL
        # The frozen-scale final norm is linear: logits of the whole = Σ logits of the parts.
        scale = run.final_scale[t]
        parts_logits = llm.final_norm_linear(heads, scale) @ llm.W_U  # [H, V]
        bias_logits = llm.final_norm_linear(bias, scale) @ llm.W_U
        whole_logits = llm.final_norm_linear(whole, scale) @ llm.W_U
        assert rel_err(parts_logits.sum(0) + bias_logits, whole_logits) < RTOL


def test_promoted_suppressed_is_linear_over_parts(model: Trace) -> None:
    tr = model
    run = tr.run
    t, layer = 5, 1

    def full_logits(update: Tensor) -> Tensor:
        # With k = V the two tables hold every token: rebuild the whole logit vector from them.
        promoted, suppressed = promoted_suppressed(tr, update, t, k=VOCAB)
        out = torch.full((VOCAB,), float("nan"))
        for s in promoted:
            out[s.token_id] = s.logit
        assert {s.token_id for s in suppressed} == set(range(VOCAB))
        return out

    lr = run.layers[layer]
    heads = [head_update(run, layer, h, t) for h in range(lr.W_O.shape[0])]
    bias = lr.b_O.float() * lr.attn_scale[t].float()
    attn = block_update(run, layer, "attention", t)
    ffn = block_update(run, layer, "ffn", t)
    parts = torch.stack([full_logits(u) for u in [*heads, bias]]).sum(0)
    assert rel_err(parts, full_logits(attn)) < RTOL
    assert rel_err(full_logits(attn) + full_logits(ffn), full_logits(attn + ffn)) < RTOL


def test_promoted_and_suppressed_tables(model: Trace) -> None:
    tr = model
    llm, run = tr.llm, tr.run
    update = block_update(run, 0, "ffn", 2)
    promoted, suppressed = promoted_suppressed(tr, update, 2, k=4)
    want = llm.final_norm_linear(update, run.final_scale[2]) @ llm.W_U  # [V], no b_U
    assert [s.token_id for s in promoted] == want.topk(4).indices.tolist()
    assert [s.token_id for s in suppressed] == want.topk(4, largest=False).indices.tolist()
    logits = [s.logit for s in promoted]
    assert logits == sorted(logits, reverse=True)
    low = [s.logit for s in suppressed]
    tol = RTOL * float(want.abs().max())  # float32 logits, relative to the largest
    assert low == sorted(low) and low[0] == pytest.approx(float(want.min()), rel=0, abs=tol)
    assert all(s.prob is None and s.rank_change is None for s in promoted + suppressed)
    assert torch.allclose(direct_logits(tr, update, 2), want, rtol=0, atol=tol)


def test_neurons_plus_bias_reproduce_ffn_update(model: Trace) -> None:
    run = model.run
    t = 3
    for layer in range(run.n_layers):
        lr = run.layers[layer]
        bias = lr.b_out.float() * lr.mlp_scale[t].float()
        if lr.experts is None:
            n_neurons = lr.neuron_acts.shape[1]
            parts = [neuron_update(run, layer, n, t) for n in range(n_neurons)]
        else:  # a mixture of experts: each routed expert, then the shared one
            experts = [*range(lr.experts.n_experts), None]
            parts = [expert_update(run, layer, e, t) for e in experts]
        total = torch.stack(parts).sum(0) + bias
        assert rel_err(total, block_update(run, layer, "ffn", t)) < RTOL


def test_neuron_update_keeps_the_sign_of_the_activation(
    model: Trace,
) -> None:
    run = model.run
    t, layer = 2, 1
    lr = run.layers[layer]
    if lr.experts is not None:
        with pytest.raises(LensError, match="no dense neurons"):
            neuron_update(run, layer, 0, t)
        return
    acts = lr.neuron_acts[t]
    negative = (acts < -1e-3).nonzero().flatten().tolist()
    assert negative, "the tiny model should have a neuron with a negative activation"
    n = negative[0]
    magnitude = acts[n].abs() * lr.W_out[n].float() * lr.mlp_scale[t].float()
    # Per entry a product of three numbers on each side: ≤ 4 roundings, 2 eps relative.
    update = neuron_update(run, layer, n, t)
    assert torch.allclose(update, -magnitude, rtol=f32_tol(terms=2), atol=0)
    assert not torch.allclose(neuron_update(run, layer, n, t), magnitude, atol=1e-6)


def test_head_update_recomputes_a_dropped_pattern(model: Trace) -> None:
    run = model.run
    stripped = dataclasses.replace(run, layers=tuple(lr.without_pattern() for lr in run.layers))
    assert torch.equal(head_update(stripped, 0, 0, 1), head_update(run, 0, 0, 1))
    cannot = dataclasses.replace(stripped, patterns=None)
    with pytest.raises(ValueError, match="keep_patterns=True"):
        head_update(cannot, 0, 0, 1)
    # Everything else works without patterns.
    assert block_update(cannot, 0, "attention", 1).shape == (run.layers[0].W_O.shape[-1],)


# -- hand-built run: exact rank changes ---------------------------------------------------------


class IdentityLlm(TransparentLlm):
    """D = V = 4, W_U = I, no norm: a residual's logits are the residual itself (+ ``b_U``)."""

    def __init__(self, b_U: list[float] | None = None) -> None:
        self._b_U = torch.zeros(4) if b_U is None else torch.tensor(b_U)

    @property
    def info(self) -> ModelInfo:
        raise NotImplementedError

    def tokenize(self, prompt: str) -> list[int]:
        raise NotImplementedError

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [f"tok{i}" for i in token_ids]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: Sequence[int]) -> str:
        raise NotImplementedError

    def hook_name(self, site: HookSite, layer: int) -> str:
        raise NotImplementedError

    def logits_with_hooks(
        self, token_ids: Sequence[int], fwd_hooks: Sequence[Hook], *, grad: bool = False
    ) -> Tensor:
        raise NotImplementedError

    def run(self, prompt: str, *, on_layer: object = None, keep_patterns: bool = True) -> ModelRun:
        raise NotImplementedError

    @property
    def W_U(self) -> Tensor:
        return torch.eye(4)

    @property
    def b_U(self) -> Tensor:
        return self._b_U

    def final_norm(self, resid: Tensor) -> Tensor:
        return resid

    def final_norm_linear(self, update: Tensor, scale: Tensor) -> Tensor:
        return update.float() / scale.float()[..., None]


def hand_run() -> ModelRun:
    """One token, two layers, hand-picked residuals (layer 1 is a parallel block)."""
    z1, z4 = torch.zeros(1), torch.zeros(1, 4)

    def layer(index: int, pre: list[float], mid: list[float] | None, post: list[float]) -> LayerRun:
        pre_t, post_t = torch.tensor([pre]), torch.tensor([post])
        mid_t = None if mid is None else torch.tensor([mid])
        attn = (post_t if mid_t is None else mid_t) - pre_t
        return LayerRun(
            index=index, resid_pre=pre_t, resid_mid=mid_t, resid_post=post_t,
            attn_update=attn, mlp_update=post_t - pre_t - attn if mid_t is None else post_t - mid_t,
            pattern=torch.ones(1, 1, 1), values=torch.zeros(1, 1, 2), neuron_acts=torch.zeros(1, 3),
            attn_scale=torch.ones(1), mlp_scale=torch.ones(1), W_O=torch.zeros(1, 2, 4),
            b_O=z4[0], W_out=torch.zeros(3, 4), b_out=z4[0],
        )  # fmt: skip

    layers = (
        layer(0, [4, 3, 2, 1], [1, 2, 3, 4], [1, 4, 3, 2]),
        layer(1, [1, 4, 3, 2], None, [1, 4, 3, 2]),  # parallel: attention writes 0 here
    )
    return ModelRun("hand", (0,), ("tok0",), torch.zeros(1, 4), layers, final_scale=z1 + 2)


def hand_trace(llm: IdentityLlm) -> Trace:
    """:func:`hand_run` as a trace (the lens reads no contribution, so its graph is empty)."""
    run = hand_run()
    empty = torch.zeros(run.n_layers, run.n_tokens)
    graph = dense_graph(empty[..., None], empty, empty)
    return Trace(llm, "hand", run, graph, predictions_of(llm, run))


def test_rank_change_on_hand_built_run() -> None:
    tr = hand_trace(IdentityLlm())
    # X0 = [4,3,2,1] → A0 = [1,2,3,4]: the order is reversed.
    scores = logit_lens(tr, "A0_0", normalize=False, k=4)
    assert [(s.token, s.rank_change) for s in scores] == [
        ("tok3", 3),
        ("tok2", 1),
        ("tok1", -1),
        ("tok0", -3),
    ]
    assert [s.logit for s in scores] == [4.0, 3.0, 2.0, 1.0]
    want_probs = torch.tensor([4.0, 3.0, 2.0, 1.0]).softmax(-1).tolist()
    # Two float32 softmaxes of 4 logits: each rounds 4 exps, their sum and a division.
    assert [s.prob for s in scores] == pytest.approx(want_probs, rel=f32_tol(terms=4 + 1))
    # A0 = [1,2,3,4] → I0 = [1,4,3,2]: tok1 jumps from rank 2 to 0, tok3 falls from 0 to 2.
    scores = logit_lens(tr, "I0_0", normalize=False, k=2)
    assert [(s.token_id, s.rank_change) for s in scores] == [(1, 2), (2, 0)]
    # X0 has nothing below it.
    assert all(s.rank_change is None for s in logit_lens(tr, "X0_0", normalize=False))
    # Parallel block: A1 = resid_pre + attention update = I0 → no change anywhere.
    assert [s.rank_change for s in logit_lens(tr, "A1_0", normalize=False)] == [0] * 4


def test_k_is_clamped_to_vocab_and_checked() -> None:
    tr = hand_trace(IdentityLlm(b_U=[10.0, 0.0, 0.0, 0.0]))
    assert len(logit_lens(tr, "I1_0", k=100)) == 4
    # The lens includes b_U (I1 = [1, 4, 3, 2] → tok0 on top); direct logits of an update don't.
    assert [(s.token_id, s.logit) for s in logit_lens(tr, "I1_0", k=1)] == [(0, 11.0)]
    promoted, suppressed = promoted_suppressed(tr, torch.tensor([0.0, -2, 6, 1]), 0, k=2)
    assert [(s.token_id, s.logit) for s in promoted] == [(2, 3.0), (3, 0.5)]
    assert [(s.token_id, s.logit) for s in suppressed] == [(1, -1.0), (0, 0.0)]
    with pytest.raises(ValueError, match="k must be at least 1"):
        logit_lens(tr, "I1_0", k=0)


def test_token_score_is_frozen() -> None:
    score = TokenScore("a", 1, 0.5)
    assert (score.prob, score.rank_change) == (None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        score.logit = 1.0  # type: ignore[misc]


# -- node ids -----------------------------------------------------------------------------------


def test_previous_node_chain() -> None:
    chain = ["I2_7"]
    while (prev := previous_node(chain[-1], n_layers=3)) is not None:
        chain.append(prev)
    assert chain == ["I2_7", "A2_7", "I1_7", "A1_7", "I0_7", "A0_7", "X0_7"]


@pytest.mark.parametrize(
    "node_id",
    ["", "X1_0", "A2_0", "I9_0", "A0_1", "M0_0", "A-1_0", "a0_0", "A0_", "A0_0 ", "A0", "Z0_0"],
)
def test_bad_node_ids_raise_value_error(node_id: str) -> None:
    run = hand_run()  # 2 layers, 1 token
    with pytest.raises(ValueError, match=r"X0_t, A\{l\}_t and I\{l\}_t") as info:
        residual_vector(run, node_id)
    assert isinstance(info.value, LlmFlowError)
    assert "0..1" in str(info.value)  # the valid layer range is listed


def test_m_node_points_to_block_update() -> None:
    with pytest.raises(ValueError, match="block_update"):
        previous_node("M0_0", n_layers=3)
    with pytest.raises(ValueError, match="X0_t"):
        previous_node("A3_0", n_layers=3)


def test_out_of_range_indices_raise_value_error() -> None:
    run = hand_run()
    with pytest.raises(ValueError, match="layer"):
        block_update(run, 2, "ffn", 0)
    with pytest.raises(ValueError, match="position"):
        block_update(run, 0, "ffn", 1)
    with pytest.raises(ValueError, match="attention, ffn"):
        block_update(run, 0, "mlp", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head"):
        head_update(run, 0, 1, 0)
    with pytest.raises(ValueError, match="neuron"):
        neuron_update(run, 0, 3, 0)
    assert torch.equal(block_update(run, -1, "attention", -1), block_update(run, 1, "attention", 0))
