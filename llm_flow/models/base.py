"""The model interface the rest of llm-flow is written against.

A :class:`TransparentLlm` runs one prompt and returns a frozen :class:`ModelRun`: every tensor the
contribution engine, the logit lens and the app need, per layer, already expressed in the terms of
Ferrando & Voita (2024): the residual stream before and after each block, what each block wrote
into it, and the per-head factors of the attention write (pattern, values, W_O).

Architecture differences are resolved here so the numeric core never branches on them:
- grouped-query attention: ``values`` has one slice per *query* head (K/V heads expanded);
- missing biases: zero vectors, never ``None``;
- post-norm blocks (Gemma 2/3): ``W_O``/``W_out``/biases carry the norm's gain and
  ``attn_scale``/``mlp_scale`` its per-token ``1/rms``, so parts still sum to the update;
- parallel attention + MLP (GPT-NeoX, Phi, GPT-J): ``resid_mid`` is ``None`` and both updates
  are added to ``resid_pre``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from llm_flow.errors import InputError, UnsupportedAnalysisError
from llm_flow.validate import check_position

if TYPE_CHECKING:
    from llm_flow.models.qk import QkCapture

# A forward hook: (hook name, fn(activation, hook)); a fn that returns a tensor replaces the
# activation downstream, one that returns None only reads it.
Hook = tuple[str, Callable[..., Any]]
# The activations interventions and attributions hook, by what they hold (see hook_name):
# "z" the per-head mixed values before W_O [T, H, d_head], "pattern" the attention pattern
# [H, T, S], "neurons" a dense FFN's post-activation neuron values [T, d_mlp], "ffn" the FFN
# block's update to the residual [T, D], "experts" an MoE layer's router weights [T, E] (zero
# for the experts not chosen; a changed weight scales that expert's output, nothing re-routes).
HookSite = Literal["z", "pattern", "neurons", "ffn", "experts"]


def at_weights(x: Tensor, w: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``x @ w`` in ``dtype``, computed on the weights' device and returned on x's: in a model
    split over devices only the activations travel (e.g. a few tokens' expert activations, not
    the expert's weights)."""
    return (x.to(device=w.device, dtype=dtype) @ w.to(dtype)).to(x.device)


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a loaded model, as ``llm-flow info`` prints them."""

    name: str
    architecture: str
    n_params: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    post_norm: bool
    parallel_blocks: bool
    normalization: str
    device: str  # where runs are captured and contributions computed
    dtype: str
    prepends_bos: bool
    n_experts: int = 0  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int = 0
    moe_layers: tuple[int, ...] = ()
    weight_devices: tuple[str, ...] = ()  # where the weights are (several with a device map)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ExpertRun:
    """What the experts of one MoE layer computed for one prompt (T tokens, k slots per token).

    ``W_out`` / ``b_out`` carry the same folds as a dense FFN's (post-norm gain, residual
    multiplier); the shared expert's per-token gate is folded into ``shared_acts``. The weights
    ``W_out`` and ``shared_W_out`` stay on their layer's device (a model split over devices);
    everything else is on the device of the run.
    """

    index: Tensor  # [T, k] the expert in each routing slot
    weight: Tensor  # [T, k] its router weight g_e(t)
    acts: Tensor  # [T, k, d_expert] the expert's neuron activations (router weight not applied)
    W_out: Tensor  # [E, d_expert, D]
    b_out: Tensor  # [E, D] zeros when the experts have no output bias
    shared_acts: Tensor | None  # [T, d_shared] shared expert's activations × its gate
    shared_W_out: Tensor | None  # [d_shared, D]
    shared_b_out: Tensor | None  # [T, D] its output bias × its gate

    @property
    def n_experts(self) -> int:
        return int(self.W_out.shape[0])

    def slot_outputs(
        self, dtype: torch.dtype = torch.float32, rows: Tensor | None = None
    ) -> Tensor:
        """Each slot's weighted expert output ``g · (act @ W_out[e] + b_out[e])`` → [T, k, D]
        (or [R, k, D] for the token positions ``rows`` [R] alone)."""
        index, weight, acts = self.index, self.weight, self.acts
        if rows is not None:
            index, weight, acts = index[rows], weight[rows], acts[rows]
        n_tokens, k, _ = acts.shape
        out = torch.zeros(n_tokens, k, self.W_out.shape[-1], dtype=dtype, device=acts.device)
        for e in index.unique().tolist():
            t, slot = (index == e).nonzero(as_tuple=True)
            out[t, slot] = at_weights(acts[t, slot], self.W_out[e], dtype)
            out[t, slot] += self.b_out[e].to(dtype)
        return out * weight.to(dtype)[..., None]

    def shared_output(
        self, dtype: torch.dtype = torch.float32, rows: Tensor | None = None
    ) -> Tensor | None:
        """The shared expert's gated output → [T, D] (or [R, D] at ``rows``), or None without
        one."""
        if self.shared_acts is None or self.shared_W_out is None or self.shared_b_out is None:
            return None
        acts, bias = self.shared_acts, self.shared_b_out
        if rows is not None:
            acts, bias = acts[rows], bias[rows]
        return at_weights(acts, self.shared_W_out, dtype) + bias.to(dtype)

    def neurons(self, t: int, expert: int | None) -> tuple[Tensor, Tensor, Tensor] | None:
        """The neurons of ``expert`` (None: the shared expert) at token t, router weight folded
        into the activations: (acts [d], W_out [d, D], b_out [D]) with ``acts @ W_out + b_out``
        its part, all on the run's device; None when the expert was not routed to at t (or there
        is no shared one)."""
        if expert is None:
            if self.shared_acts is None or self.shared_W_out is None or self.shared_b_out is None:
                return None
            acts = self.shared_acts[t]
            return acts, self.shared_W_out.to(acts.device), self.shared_b_out[t]
        slots = (self.index[t] == expert).nonzero().flatten().tolist()
        if not slots:
            return None
        g = self.weight[t, slots[0]]
        acts = self.acts[t, slots[0]] * g
        return acts, self.W_out[expert].to(acts.device), self.b_out[expert] * g

    def total(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Σ of every expert part → [T, D] (before the post-norm scale)."""
        routed = self.slot_outputs(dtype).sum(1)
        shared = self.shared_output(dtype)
        return routed if shared is None else routed + shared

    def to(self, device: torch.device) -> ExpertRun:
        """A copy whose activations, routing and biases are on ``device``; the weights stay
        where they are."""

        def there(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return replace(
            self,
            index=self.index.to(device),
            weight=self.weight.to(device),
            acts=self.acts.to(device),
            b_out=self.b_out.to(device),
            shared_acts=there(self.shared_acts),
            shared_b_out=there(self.shared_b_out),
        )


@dataclass(frozen=True)
class LayerRun:
    """Everything one layer computed for one prompt (T tokens), batch dimension removed.

    Activations keep the model's dtype; weights are views of the model's parameters (with the
    post-norm gain folded in where the block has one), never copies of the whole model. In a
    model split over devices the weights ``W_O`` and ``W_out`` stay on the layer's device and
    everything else (activations, biases) is on the run's device; the products here move the
    weights for the computation.
    """

    index: int
    resid_pre: Tensor  # [T, D]
    resid_mid: Tensor | None  # [T, D]; None for parallel attention + MLP blocks
    resid_post: Tensor  # [T, D]
    attn_update: Tensor  # [T, D] what attention added to the residual stream
    mlp_update: Tensor  # [T, D] what the FFN added to the residual stream
    pattern: Tensor | None  # [H, T_query, T_source]; None once dropped to save memory
    values: Tensor  # [T, H, d_head] per query head (GQA already expanded)
    neuron_acts: Tensor  # [T, d_mlp] post-activation (gated MLPs: act(gate) * up)
    attn_scale: Tensor  # [T] post-norm 1/rms per token; ones for pre-norm blocks
    mlp_scale: Tensor  # [T]
    W_O: Tensor  # [H, d_head, D] post-norm gain folded in
    b_O: Tensor  # [D] zeros when the model has no output bias; [T, D] in an intervened run
    W_out: Tensor  # [d_mlp, D] post-norm gain folded in
    b_out: Tensor  # [D]; [T, D] in an intervened MoE run
    experts: ExpertRun | None = None  # a mixture-of-experts FFN's parts (neuron_acts is [T, 0])
    # The query positions ``pattern`` holds, sorted: it is then [H, R, T_source] (a pattern
    # recomputed for the rows a view needs, see ModelRun.with_attention). None: every position.
    pattern_rows: Tensor | None = None

    @property
    def mlp_base(self) -> Tensor:
        """What the FFN update is added to in its sum → [T, D]: resid_mid, or for parallel blocks
        the rest of the one sum into resid_post (residual + attention update)."""
        return self.resid_post - self.mlp_update if self.resid_mid is None else self.resid_mid

    @property
    def token_b_O(self) -> Tensor:
        """The attention output bias of every token → [T, D] (a view when ``b_O`` is [D])."""
        return self.b_O.expand_as(self.resid_pre)

    def head_outputs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-source, per-head output vectors ``v[s, h] @ W_O[h]`` → [T, H, D].

        The attention part of source s at query t is ``Σ_h pattern[h, t, s] · attn_scale[t] ·
        head_outputs[s, h]``.
        """
        # W_O ([H, d_head, D]) travels rather than the [T, H, D] result: smaller past a few
        # tokens. One batched product per head; the result is a view of its [H, T, D] output,
        # the layout the CPU kernels read (no copy there).
        W_O = self.W_O.to(device=self.values.device, dtype=dtype)
        return torch.bmm(self.values.to(dtype).transpose(0, 1), W_O).transpose(0, 1)

    def holds_attention(self, rows: Tensor | None) -> bool:
        """Whether the pattern is here for the query ``rows`` (None: every row)."""
        if self.pattern is None:
            return False
        if self.pattern_rows is None:
            return True
        return rows is not None and bool(torch.isin(rows.cpu(), self.pattern_rows).all())

    def attention_at(self, rows: Tensor) -> Tensor:
        """The attention pattern at query positions ``rows`` [R] → [H, R, T_source]."""
        if not self.holds_attention(rows):
            raise InputError(
                f"layer {self.index} holds no attention pattern for these rows; "
                "get them with ModelRun.with_attention"
            )
        assert self.pattern is not None
        if self.pattern_rows is None:
            return self.pattern[:, rows.to(self.pattern.device)]
        index = torch.searchsorted(self.pattern_rows, rows.cpu())
        return self.pattern[:, index.to(self.pattern.device)]

    def sink_share(self) -> Tensor | None:
        """Each head's share of attention given to no token, ``1 − Σ_s pattern`` → [H, T]
        (or [H, R] for the rows of a recomputed pattern):
        the attention sink of GPT-OSS-style heads (a softmax logit without a value), kept as
        its own part of the pattern rather than renormalized away; ≈ 0 without sinks. None
        once the pattern is dropped."""
        if self.pattern is None:
            return None
        return (1 - self.pattern.float().sum(-1)).clamp_min(0)

    def without_pattern(self) -> LayerRun:
        """A copy that no longer holds the [H, T, T] attention pattern."""
        return replace(self, pattern=None, pattern_rows=None)


# Recomputes attention patterns of a run: {layer: query rows [R] sorted, or None for every row}
# → {layer: pattern [H, R or T, T]} from one forward pass (see TransparentLlm.attention_rows).
PatternSource = Callable[[Mapping[int, Tensor | None]], dict[int, Tensor]]


@dataclass(frozen=True)
class ModelRun:
    """One forward pass on one prompt. Immutable: a new run never changes an old one."""

    model_name: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    logits: Tensor  # [T, V] float32
    layers: tuple[LayerRun, ...]
    final_scale: Tensor  # [T] scale the final norm divided each last residual by
    # How to recompute dropped attention patterns (the model and the run's interventions).
    patterns: PatternSource | None = field(default=None, compare=False, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def with_attention(self, rows: Mapping[int, Tensor | Sequence[int] | None]) -> ModelRun:
        """This run with the attention pattern of each listed layer at query ``rows`` (None:
        every row). Layers that kept their pattern are used as they are; the patterns of the
        others are recomputed, all in one forward pass that stops after the last of them, and
        hold just those rows (``LayerRun.pattern_rows``): memory stays O(R · T) per layer."""
        wanted = {
            layer: None if r is None else torch.as_tensor(r, dtype=torch.long).cpu().unique()
            for layer, r in rows.items()
        }
        missing = {
            layer: r for layer, r in wanted.items() if not self.layers[layer].holds_attention(r)
        }
        if not missing:
            return self
        if self.patterns is None:
            raise InputError(
                f"layer {min(missing)} of this run holds no attention pattern and the run cannot "
                "recompute it; run the model with keep_patterns=True"
            )
        layers = list(self.layers)
        for layer, pattern in self.patterns(missing).items():
            layers[layer] = replace(layers[layer], pattern=pattern, pattern_rows=missing[layer])
        return replace(self, layers=tuple(layers))

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def parallel_blocks(self) -> bool:
        return self.layers[0].resid_mid is None

    def position(self, position: int) -> int:
        """Normalize a possibly negative position; :class:`PositionError` when out of range."""
        return check_position(position, self.n_tokens)


LayerCallback = Callable[[LayerRun], None]


class _PatternsFound(Exception):
    """Stops a pass once every attention pattern asked for is captured."""


class TransparentLlm(ABC):
    """A language model whose forward pass is fully exposed."""

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    def tokenize(self, prompt: str) -> list[int]:
        """Token ids exactly as the model will consume them (BOS per the model's tokenizer)."""

    @abstractmethod
    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Readable string of each token id."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as a piece of a prompt: no BOS or other special tokens."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of a sequence of token ids."""

    @abstractmethod
    def hook_name(self, site: HookSite, layer: int) -> str:
        """The name of the hook point of ``site`` in ``layer``, for :meth:`logits_with_hooks`
        and :meth:`run`'s ``fwd_hooks``. Nothing outside ``llm_flow.models`` spells one."""

    @abstractmethod
    def logits_with_hooks(
        self, token_ids: Sequence[int], fwd_hooks: Sequence[Hook], *, grad: bool = False
    ) -> Tensor:
        """Logits [T, V] of one forward pass over ``token_ids`` with ``fwd_hooks`` attached.

        Nothing is captured or self-checked (an intervention breaks the run's identities on
        purpose). With ``grad=True`` the pass runs with autograd on and the logits keep their
        graph and dtype, for gradients with respect to hooked activations; otherwise they are
        float32.
        """

    @abstractmethod
    def run(
        self,
        prompt: str | Sequence[int],
        *,
        on_layer: LayerCallback | None = None,
        keep_patterns: bool = True,
        fwd_hooks: Sequence[Hook] = (),
    ) -> ModelRun:
        """Run one forward pass over a prompt (or token ids used as they are).

        ``on_layer`` is called with each :class:`LayerRun` as soon as that layer has run, so a
        consumer can reduce it (e.g. to contributions) before the next layer starts; with
        ``keep_patterns=False`` the returned run holds no attention patterns. ``fwd_hooks``
        (hook name, fn) intervene before anything is captured, so the run — and every
        self-check — describes the intervened forward pass; what an intervention writes into a
        head's output that no source token explains becomes that token's bias (``b_O`` [T, D]).
        """

    @property
    @abstractmethod
    def W_U(self) -> Tensor:
        """Unembedding matrix [D, V]."""

    @property
    @abstractmethod
    def b_U(self) -> Tensor:
        """Unembedding bias [V] (zeros when absent)."""

    @abstractmethod
    def final_norm(self, resid: Tensor) -> Tensor:
        """Apply the model's final norm to residual states [..., D]."""

    @abstractmethod
    def final_norm_linear(self, update: Tensor, scale: Tensor) -> Tensor:
        """The final norm as a linear map with a frozen per-token ``scale`` [...]: centring (for
        LayerNorm) and gain, without the bias. Used to read an update's direct effect on logits."""

    def plain_logits(self, token_ids: Sequence[int]) -> Tensor:
        """Logits [T, V] of the model's own forward pass, with no hook, capture or self-check
        and its fastest attention implementation: the baseline ``bench`` measures a run against
        (:attr:`plain_attention` says what ran). By default a hooked pass with no hooks."""
        return self.logits_with_hooks(token_ids, [])

    @property
    def plain_attention(self) -> str:
        """What :meth:`plain_logits` runs, e.g. ``"transformers, sdpa attention"``."""
        return "hooked model, no hooks"

    def edits_pattern(self) -> bool:
        """Whether a hook on the ``pattern`` site changes what the model computes (some
        attention implementations compute it inside a module the hook cannot reach)."""
        return True

    def attention_rows(
        self,
        token_ids: Sequence[int],
        rows: Mapping[int, Tensor | None],
        fwd_hooks: Sequence[Hook] = (),
    ) -> dict[int, Tensor]:
        """The attention pattern of each layer in ``rows`` at its query rows [R] (None: every
        row) → {layer: [H, R, T]}, from one pass over ``token_ids`` with ``fwd_hooks`` (a run's
        interventions) that stops once the last listed layer's attention has run."""
        found: dict[int, Tensor] = {}
        last = max(rows)
        home = torch.device(self.info.device)

        def grab(layer: int, wanted: Tensor | None) -> Callable[..., None]:
            def hook(tensor: Tensor, hook: Any) -> None:
                pattern = tensor[0].detach()
                pattern = pattern if wanted is None else pattern[:, wanted.to(tensor.device)]
                found[layer] = pattern.to(home)  # a model split over devices: the run's device
                if layer == last:
                    raise _PatternsFound

            return hook

        grabs = [(self.hook_name("pattern", layer), grab(layer, r)) for layer, r in rows.items()]
        with contextlib.suppress(_PatternsFound):  # raised once the later layers are not needed
            self.logits_with_hooks(token_ids, [*fwd_hooks, *grabs])
        return found

    def qk_capture(self, token_ids: Sequence[int], layer: int) -> QkCapture:
        """``layer``'s queries, keys and pre-softmax scores over ``token_ids`` and its query/key
        maps at the pass's frozen norm scales (:class:`~llm_flow.models.qk.QkCapture`), from
        one pass that stops after that layer's attention; :class:`UnsupportedAnalysisError`
        where the scores cannot be decomposed."""
        raise UnsupportedAnalysisError(
            f"QK attribution is not supported for {self.info.architecture}: this model exposes "
            "no queries and keys"
        )

    def unembed(self, resid: Tensor, *, normalize: bool = True) -> Tensor:
        """Logits [..., V] of residual states [..., D], through the final norm or not."""
        x = self.final_norm(resid) if normalize else resid
        return x.to(self.W_U.dtype) @ self.W_U + self.b_U
