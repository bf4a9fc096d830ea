"""Logit lens and the tokens each part of the model promotes or suppresses.

Two readings of a vector in the residual stream through the unembedding:

- **Logit lens** (nostalgebraist, "interpreting GPT: the logit lens", LessWrong 2020): decode an
  intermediate residual state ``r`` as if it were the last one, ``logits = norm(r) @ W_U + b_U``,
  and watch how the top tokens change from layer to layer (``rank_change``).
- **Direct logit attribution** of an *update* ``u`` that a block, head or neuron writes into the
  residual stream: its direct effect on the output logits is ``norm_lin(u; s) @ W_U``, where
  ``norm_lin`` is the final norm as a linear map with the per-token scale ``s`` frozen to the one
  the final norm actually used at that position (``run.final_scale[t]``), without the norm's
  bias and without ``b_U``. With the scale frozen the map is linear, so the logits of a sum of
  parts are the sum of the parts' logits (Σ heads + bias = the attention update's logits).

Residual nodes follow the graph's names: ``X0_t`` (embedding), ``A{l}_t`` (after attention of
layer l; ``resid_pre + attn_update`` for parallel blocks, which never materialize it) and
``I{l}_t`` (after layer l). ``M{l}_t`` is the FFN block, not a residual state: read it with
:func:`block_update`.

Everything is vectorized over the vocabulary and crosses to Python once per call (``.tolist()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from llm_flow.engine import nodes
from llm_flow.engine.nodes import Node
from llm_flow.engine.trace import Trace
from llm_flow.errors import LensError
from llm_flow.models.base import LayerRun, ModelRun, TransparentLlm
from llm_flow.validate import check_position

Block = Literal["attention", "ffn"]
BLOCKS: tuple[Block, ...] = ("attention", "ffn")


@dataclass(frozen=True)
class TokenScore:
    """One row of a token table.

    ``prob`` is the softmax probability over the full vocabulary (logit lens only);
    ``rank_change`` is the token's rank at the previous residual node minus its rank here, so
    positive means it moved up (None where there is no previous node or no ranking).
    """

    token: str
    token_id: int
    logit: float
    prob: float | None = None
    rank_change: int | None = None


# -- node ids ---------------------------------------------------------------------------------


def _valid_forms(n_layers: int | None, n_tokens: int | None) -> str:
    layers = "" if n_layers is None else f" with layer l in 0..{n_layers - 1}"
    tokens = "" if n_tokens is None else f" and position t in 0..{n_tokens - 1}"
    return f"valid residual node ids are X0_t, A{{l}}_t and I{{l}}_t{layers}{tokens}"


def parse_node(node_id: str, n_layers: int, n_tokens: int | None = None) -> Node:
    """The residual node ``node_id`` (X, A or I) of a run with ``n_layers`` layers and
    ``n_tokens`` tokens; raises :class:`LensError` listing the valid forms."""
    node = nodes.parse_node(node_id)
    if node is None or not node.is_residual:
        hint = ""
        if node is not None:
            hint = " (M{l}_t is the FFN block, not a residual state: use block_update)"
        raise LensError(f"unknown node id {node_id!r}{hint}; {_valid_forms(n_layers, n_tokens)}")
    if node.layer >= n_layers or (n_tokens is not None and node.token >= n_tokens):
        raise LensError(
            f"node id {node_id!r} is outside this run; {_valid_forms(n_layers, n_tokens)}"
        )
    return node


def previous_node(node_id: str, n_layers: int) -> str | None:
    """The residual node just below ``node_id`` at the same position (see
    :func:`llm_flow.engine.nodes.previous_node`), or None for an embedding."""
    below = nodes.previous_node(parse_node(node_id, n_layers))
    return None if below is None else below.id


def residual_vector(run: ModelRun, node_id: str) -> Tensor:
    """The residual state at ``node_id`` → [D] float32."""
    node = parse_node(node_id, run.n_layers, run.n_tokens)
    layer, t = run.layers[node.layer], node.token
    if node.kind == "X":
        return layer.resid_pre[t].float()
    if node.kind == "I":
        return layer.resid_post[t].float()
    if layer.resid_mid is None:  # parallel blocks: define A{l} as what attention alone wrote
        return layer.resid_pre[t].float() + layer.attn_update[t].float()
    return layer.resid_mid[t].float()


def update_between(run: ModelRun, node_id: str) -> Tensor | None:
    """The update written by the block just below ``node_id`` → [D] float32, or None for X0.

    ``A{l}_t`` → attention's update of layer l, ``I{l}_t`` → the FFN's update of layer l; so
    ``residual_vector(node) = residual_vector(previous_node(node)) + update_between(node)``.
    """
    node = parse_node(node_id, run.n_layers, run.n_tokens)
    if node.kind == "X":
        return None
    block: Block = "attention" if node.kind == "A" else "ffn"
    return block_update(run, node.layer, block, node.token)


# -- updates: blocks, heads, neurons ----------------------------------------------------------


def _index(what: str, value: int, size: int) -> int:
    """Normalize a possibly negative index into ``range(size)`` or raise :class:`LensError`
    (positions: :class:`PositionError`)."""
    if what == "position":
        return check_position(value, size)
    if not -size <= value < size:
        raise LensError(f"{what} {value} is out of range; valid {what}s are 0..{size - 1}")
    return value % size


def _layer(run: ModelRun, layer: int) -> LayerRun:
    return run.layers[_index("layer", layer, run.n_layers)]


def block_update(run: ModelRun, layer: int, block: Block, position: int) -> Tensor:
    """What the attention or FFN block of ``layer`` added to the residual at ``position`` →
    [D] float32."""
    layer_run = _layer(run, layer)
    t = _index("position", position, run.n_tokens)
    if block == "attention":
        return layer_run.attn_update[t].float()
    if block == "ffn":
        return layer_run.mlp_update[t].float()
    raise LensError(f"unknown block {block!r}; valid blocks are {', '.join(BLOCKS)}")


def head_update(run: ModelRun, layer: int, head: int, position: int) -> Tensor:
    """What one attention head wrote at ``position`` → [D] float32.

    ``attn_scale[t] · Σ_s pattern[h, t, s] · (values[s, h] @ W_O[h])``; the heads plus
    ``b_O · attn_scale[t]`` sum to the block's update.
    """
    index = _layer(run, layer).index
    h = _index("head", head, run.layers[index].values.shape[1])
    t = _index("position", position, run.n_tokens)
    layer_run = run.with_attention({index: [t]}).layers[index]
    f32 = torch.float32
    # Mix the values first so nothing is [T, D]: [S] @ [S, d_head] → [d_head].
    pattern = layer_run.attention_at(torch.tensor([t]))[h, 0]  # [S]
    mixed = pattern.to(f32) @ layer_run.values[:, h].to(f32)
    W_O = layer_run.W_O[h].to(device=mixed.device, dtype=f32)  # [d_head, D]
    return layer_run.attn_scale[t].to(f32) * (mixed @ W_O)  # [D]


def neuron_update(run: ModelRun, layer: int, neuron: int, position: int) -> Tensor:
    """What one FFN neuron wrote at ``position`` → [D] float32.

    ``neuron_acts[t, n] · W_out[n] · mlp_scale[t]``, the activation's sign kept; the neurons plus
    ``b_out · mlp_scale[t]`` sum to the block's update.
    """
    layer_run = _layer(run, layer)
    if layer_run.experts is not None:
        raise LensError(
            f"layer {layer_run.index} is a mixture of experts, which has no dense neurons; "
            "read an expert's update instead"
        )
    n = _index("neuron", neuron, layer_run.neuron_acts.shape[1])
    t = _index("position", position, run.n_tokens)
    f32 = torch.float32
    act = layer_run.neuron_acts[t, n].to(f32) * layer_run.mlp_scale[t].to(f32)
    return act * layer_run.W_out[n].to(device=act.device, dtype=f32)  # [D]


def expert_update(run: ModelRun, layer: int, expert: int | None, position: int) -> Tensor:
    """What one routed expert (``None``: the shared expert) of a mixture-of-experts layer wrote
    at ``position`` → [D] float32: its router weight times its output (zero when it was not
    routed to there), times the post-norm scale. The experts' updates sum to the block's."""
    layer_run = _layer(run, layer)
    ex = layer_run.experts
    if ex is None:
        raise LensError(f"layer {layer_run.index} has a dense FFN, not experts")
    t = _index("position", position, run.n_tokens)
    scale = layer_run.mlp_scale[t].float()
    at = torch.tensor([t], device=ex.index.device)
    if expert is None:
        shared = ex.shared_output(rows=at)
        if shared is None:
            raise LensError(f"layer {layer_run.index} has no shared expert")
        return shared[0] * scale
    e = _index("expert", expert, ex.n_experts)
    slots = ex.slot_outputs(rows=at)[0]  # [k, D]
    return (slots * (ex.index[t] == e).to(slots)[:, None]).sum(0) * scale


def expert_neuron_update(
    run: ModelRun, layer: int, expert: int | None, neuron: int, position: int
) -> Tensor:
    """What one neuron of a routed expert (``None``: the shared expert) wrote at ``position`` →
    [D] float32: router weight × activation × its output row × the post-norm scale, the sign
    kept. Zero when the expert was not routed to there."""
    layer_run = _layer(run, layer)
    ex = layer_run.experts
    if ex is None:
        raise LensError(f"layer {layer_run.index} has a dense FFN, not experts")
    t = _index("position", position, run.n_tokens)
    parts = ex.neurons(t, None if expert is None else _index("expert", expert, ex.n_experts))
    if parts is None:
        return torch.zeros(layer_run.resid_post.shape[-1], device=layer_run.resid_post.device)
    acts, W_out, _ = parts
    n = _index("neuron", neuron, acts.shape[0])
    return acts[n].float() * layer_run.mlp_scale[t].float() * W_out[n].float()


# -- token tables -----------------------------------------------------------------------------


def _ranks(logits: Tensor, ids: Tensor) -> Tensor:
    """Rank of each token in ``ids`` [k] within ``logits`` [V] (0 = highest; ties share the
    better rank) → [k]: the number of tokens with a strictly higher logit.

    Via one sort and a binary search, O(V log V), so any k works (the [k, V] comparison
    ``(logits > logits[ids, None]).sum(-1)`` would not scale to k ≈ V on a 256k vocabulary).
    """
    ascending = logits.sort().values  # [V]
    at_or_below = torch.searchsorted(ascending, logits[ids].contiguous(), right=True)
    return logits.numel() - at_or_below


def _check_k(k: int, vocab: int) -> int:
    if k < 1:
        raise LensError(f"k must be at least 1, got {k}")
    return min(k, vocab)


def logit_lens(
    trace: Trace,
    node_id: str,
    *,
    normalize: bool = True,
    k: int = 10,
) -> list[TokenScore]:
    """Top-``k`` tokens of the residual at ``node_id`` decoded with the unembedding.

    Through the final norm if ``normalize`` (so ``I{L-1}_t`` reproduces the model's own
    prediction), else ``resid @ W_U + b_U``. Probabilities are a softmax over the full
    vocabulary; ``rank_change`` compares each token's rank with the node just below.
    """
    llm, run = trace.llm, trace.run
    previous = previous_node(node_id, run.n_layers)
    resid = residual_vector(run, node_id)  # validates the position too
    rows = [resid] if previous is None else [resid, residual_vector(run, previous)]
    logits = llm.unembed(torch.stack(rows), normalize=normalize).float()  # [1 or 2, V]
    current = logits[0]
    k = _check_k(k, current.numel())
    top = current.topk(k)
    probs = current.softmax(-1)[top.indices]  # [k]
    columns = [top.indices, top.values, probs]
    if previous is not None:
        change = _ranks(logits[1], top.indices) - _ranks(current, top.indices)  # [k]
        columns.append(change)
    # float64 holds token ids and ranks exactly: one crossing to Python for the whole table.
    table = torch.stack([c.to(torch.float64) for c in columns], dim=1).tolist()  # [k, 3 or 4]
    ids = [int(row[0]) for row in table]
    strings = llm.token_strings(ids)
    return [
        TokenScore(
            token=token,
            token_id=token_id,
            logit=row[1],
            prob=row[2],
            rank_change=None if previous is None else int(row[3]),
        )
        for token, token_id, row in zip(strings, ids, table, strict=True)
    ]


def direct_logits(trace: Trace, update: Tensor, position: int) -> Tensor:
    """Direct effect of ``update`` [..., D] at ``position`` on the output logits → [..., V]
    float32: the final norm as a linear map with the run's frozen scale, then ``W_U`` (no bias).
    """
    return run_direct_logits(trace.llm, trace.run, update, position)


def run_direct_logits(llm: TransparentLlm, run: ModelRun, update: Tensor, position: int) -> Tensor:
    """:func:`direct_logits` of a run that has no trace (no contribution graph)."""
    t = _index("position", position, run.n_tokens)
    normed = llm.final_norm_linear(update, run.final_scale[t])  # [..., D] float32
    W_U = llm.W_U  # [D, V]
    # Cast the small vector to W_U's dtype rather than copying [D, V] (~0.5 GB for a 7B model
    # in float32); half-precision models then get half-precision logits, enough for ranking.
    return (normed.to(W_U.dtype) @ W_U).float()


def promoted_suppressed(
    trace: Trace,
    update: Tensor,
    position: int,
    *,
    k: int = 10,
) -> tuple[list[TokenScore], list[TokenScore]]:
    """The ``k`` tokens an update [D] promotes most (highest direct logits, descending) and
    suppresses most (lowest, ascending: most negative first). ``prob`` is None."""
    return run_promoted_suppressed(trace.llm, trace.run, update, position, k=k)


def run_promoted_suppressed(
    llm: TransparentLlm, run: ModelRun, update: Tensor, position: int, *, k: int = 10
) -> tuple[list[TokenScore], list[TokenScore]]:
    """:func:`promoted_suppressed` of a run that has no trace (no contribution graph)."""
    logits = run_direct_logits(llm, run, update, position)  # [V]
    k = _check_k(k, logits.numel())
    high = logits.topk(k)
    low = logits.topk(k, largest=False)
    ids = torch.cat([high.indices, low.indices])  # [2k]
    values = torch.cat([high.values, low.values])  # [2k]
    table = torch.stack([ids.to(torch.float64), values.to(torch.float64)], dim=1).tolist()
    token_ids = [int(row[0]) for row in table]
    strings = llm.token_strings(token_ids)
    scores = [
        TokenScore(token=token, token_id=token_id, logit=row[1])
        for token, token_id, row in zip(strings, token_ids, table, strict=True)
    ]
    return scores[:k], scores[k:]
