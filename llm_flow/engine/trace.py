"""One prompt, one forward pass: the model's run, its full contribution graph and every
position's prediction, as one immutable :class:`Trace` that every analysis takes.

Each layer's contributions are computed inside the forward pass, as soon as the layer has run
(the run's ``on_layer`` callback), and its dense [T, T] attention edges are sparsified there
(:func:`~llm_flow.engine.graph.sparse_layer`), so one dense layer is alive at a time; without kept
patterns only one layer's attention pattern is too: holding every layer's patterns is what runs
out of memory first on long prompts (L · H · T² values: 4.5 GB for SmolLM2 at 2048 tokens, 17 GB
for Llama-3.1-8B at 4096 in bf16). A trace keeps them while they fit in :data:`PATTERN_BUDGET`;
views that need a dropped pattern get it recomputed for just their rows
(:meth:`~llm_flow.models.base.ModelRun.with_attention`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from llm_flow.engine.graph import (
    ATTENTION_FLOOR,
    FlowGraph,
    SparseLayer,
    contributions_of,
    sparse_layer,
)
from llm_flow.models.base import Hook, LayerRun, ModelRun, TransparentLlm
from llm_flow.validate import check_attention_floor, check_position


class Prediction(NamedTuple):
    """The greedy next token after a position and its probability; unpacks as
    ``(token, id, prob)``."""

    token: str
    id: int
    prob: float


@dataclass(frozen=True)
class Trace:
    """A model's run on one prompt, its contribution graph and each position's prediction.

    Immutable: analyses read it and return new objects, so one trace can be shared (the app
    caches it per model and prompt) without results mixing.
    """

    llm: TransparentLlm
    prompt: str
    run: ModelRun
    graph: FlowGraph
    predictions: tuple[Prediction, ...]  # [T] the greedy prediction after each position

    @property
    def tokens(self) -> tuple[str, ...]:
        """Each token as the model consumed it (BOS included when the tokenizer adds one)."""
        return self.run.tokens

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.run.token_ids

    @property
    def n_tokens(self) -> int:
        return self.run.n_tokens

    @property
    def n_layers(self) -> int:
        return self.run.n_layers

    def position(self, position: int) -> int:
        """``position`` in ``0..T-1`` (negative counts from the end); :class:`PositionError`
        when the prompt has no such token."""
        return check_position(position, self.n_tokens)

    def prediction(self, position: int = -1) -> Prediction:
        """The model's greedy next token after ``position``: ``(token, id, prob)``."""
        return self.predictions[self.position(position)]


PATTERN_BUDGET = 2 * 2**30  # bytes of attention patterns a trace keeps for instant per-head views


def keeps_patterns(llm: TransparentLlm, n_tokens: int, budget: int = PATTERN_BUDGET) -> bool:
    """Whether every layer's attention patterns of an ``n_tokens`` prompt fit in ``budget``."""
    info = llm.info
    element = torch.finfo(getattr(torch, info.dtype)).bits // 8
    return info.n_layers * info.n_heads * n_tokens**2 * element <= budget


FULL_GRAPH_BUDGET = 256 * 2**20  # bytes of attention edges a trace stores all of (floor 0)


def attention_floor_for(
    llm: TransparentLlm, n_tokens: int, budget: int = FULL_GRAPH_BUDGET
) -> float:
    """The attention floor a trace uses when none is given: 0 (every causal edge, so a route at
    τ = 0 is the whole graph) while all of them fit in ``budget`` — 8 bytes per edge, L·T(T+1)/2
    edges: SmolLM2 up to ~1,000 tokens — else :data:`ATTENTION_FLOOR`."""
    edges = llm.info.n_layers * n_tokens * (n_tokens + 1) // 2
    return 0.0 if edges * 8 <= budget else ATTENTION_FLOOR


def predictions_of(llm: TransparentLlm, run: ModelRun) -> tuple[Prediction, ...]:
    """The greedy prediction after every position of ``run`` (one softmax, one decode)."""
    probs, ids = run.logits.softmax(-1).max(-1)  # [T], [T]
    id_list = ids.tolist()
    strings = llm.token_strings(id_list)
    return tuple(
        Prediction(token=s, id=i, prob=p)
        for s, i, p in zip(strings, id_list, probs.tolist(), strict=True)
    )


def trace(
    llm: TransparentLlm,
    prompt: str,
    *,
    keep_patterns: bool | None = None,
    memory_budget: int | None = None,
    attention_floor: float | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    fwd_hooks: Sequence[Hook] = (),
) -> Trace:
    """Run ``prompt`` once and build its full contribution graph.

    With ``fwd_hooks`` it is the trace of the intervened pass (see
    :meth:`~llm_flow.models.base.TransparentLlm.run`). ``keep_patterns=False`` frees each
    layer's attention maps once its contributions are computed (per-head views then recompute
    the rows they need); None keeps them while they fit in :data:`PATTERN_BUDGET`. Attention
    edges below ``attention_floor`` are not stored (0 stores every causal edge: [L, T, T]
    memory); None stores all while they fit in :data:`FULL_GRAPH_BUDGET`.
    ``on_layer(done, total)`` reports progress.
    """
    n_tokens = len(llm.tokenize(prompt))
    if attention_floor is None:
        attention_floor = attention_floor_for(llm, n_tokens)
    check_attention_floor(attention_floor)  # before the forward pass, not after its first layer
    done: list[SparseLayer] = []
    n_layers = llm.info.n_layers

    def reduce(layer: LayerRun) -> None:
        c = contributions_of(layer, memory_budget=memory_budget)
        done.append(sparse_layer(c, attention_floor))
        if on_layer is not None:
            on_layer(len(done), n_layers)

    if keep_patterns is None:
        keep_patterns = keeps_patterns(llm, n_tokens)
    run = llm.run(prompt, on_layer=reduce, keep_patterns=keep_patterns, fwd_hooks=fwd_hooks)
    return Trace(llm, prompt, run, FlowGraph.from_layers(run, done), predictions_of(llm, run))
