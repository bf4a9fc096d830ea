"""The attention of a capture pass: the Hugging Face module's own forward, with its softmax done
in causal query blocks, and the pattern handed to TransformerLens's ``hook_pattern``.

TransformerLens reimplements each attention module to hook its pattern, and computes it over
the whole [H, T, T] square: both products (scores and pattern · values) at full size, then the
scale, the mask and the softmax as separate passes over ~38 MB a layer (SmolLM2, 1024 tokens).
A causal pattern is zero above its diagonal, so a block of queries needs only the keys up to its
last one: with blocks of :data:`QUERY_BLOCK` rows both products shrink to ~56 % at 1024 tokens
and the mask is added only where it is read. Measured on the 2-core CPU (SmolLM2, 1024 tokens):
one layer's attention core 14 ms against TransformerLens's 24 ms (sdpa, which returns no
pattern: 11 ms); a whole pass 2.08–2.29 s against 2.33–2.39 s.

Everything family-specific stays the model's: during the pass each bridged attention module
runs its Hugging Face module's forward (projections, rotary, q/k norms, gates), whose attention
function is selected by the config's ``_attn_implementation``; it is set to
:data:`IMPLEMENTATION` for the pass, and the function is :func:`attention`. Where the family's
own eager attention function is not the generic one (soft-capped scores, attention sinks: its
code differs from Llama's) or the mask is not causal, the family's eager function runs instead,
unchanged. Either way ``hook_pattern`` fires with the pattern that made the output, after the
output is made: the pass serves captures only, never interventions, which go through
TransformerLens's own forward (:func:`capturing`'s callers decide).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llm_flow.models.dispatch import is_dispatched

# The name the pass's attention function and mask function are registered under.
IMPLEMENTATION = "llm_flow_capture"
# Query rows per block: 128 against 256 measured 14.2 against 15.2 ms a SmolLM2 layer at 1024
# tokens; smaller blocks pay more per-block overhead than they save.
QUERY_BLOCK = 128


def _eager(module: Any) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """The eager attention function of ``module``'s modelling file (None: it has none)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


@functools.cache
def _generic_code() -> tuple[bytes, tuple[Any, ...], tuple[str, ...]]:
    from transformers.models.llama import modeling_llama

    code = modeling_llama.eager_attention_forward.__code__
    return code.co_code, code.co_consts, code.co_names


def _is_generic(eager: Callable[..., Any]) -> bool:
    """Whether ``eager`` is Llama's eager attention, copied: the same bytecode, constants and
    names (transformers copies it into most modelling files), so :func:`_blocked` is it."""
    code = getattr(eager, "__code__", None)
    return code is not None and (code.co_code, code.co_consts, code.co_names) == _generic_code()


def _causal(mask: Tensor) -> bool:
    """Whether ``mask`` is additive [..., T, T] and hides every key after its query."""
    if not mask.is_floating_point() or mask.shape[-1] != mask.shape[-2]:
        return False
    upper = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).triu_(1)
    return bool((mask <= torch.finfo(mask.dtype).min / 2)[..., upper].all())


def _blocked(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """Llama's eager attention in causal query blocks: query [B, H, T, d], key and value
    [B, H_kv, T, d], a causal additive mask [B|1, H|1, T, T] → (output [B, T, H, d], pattern
    [B, H, T, T], zero above the diagonal)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, 1)  # query head h reads kv head h // groups
    value = value.repeat_interleave(groups, 1)
    b, h, t, _ = query.shape
    pattern = query.new_empty(b, h, t, t)
    out = query.new_empty(b, h, t, value.shape[-1])
    keys_t = key.transpose(-2, -1)
    for q0 in range(0, t, QUERY_BLOCK):
        q1 = min(q0 + QUERY_BLOCK, t)
        scores = torch.matmul(query[:, :, q0:q1], keys_t[..., :q1]).mul_(scaling)  # [B, H, q, q1]
        scores.add_(mask[..., q0:q1, :q1])  # later keys: hidden by the mask, 0 after softmax
        block = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
        pattern[..., q0:q1, :q1] = block
        pattern[..., q0:q1, q1:] = 0
        torch.matmul(block, value[:, :, :q1], out=out[:, :, q0:q1])
    return out.transpose(1, 2).contiguous(), pattern


def attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The attention function of a capture pass (transformers' attention interface): the
    output and the pattern, which ``module``'s bridge hooks (``hook_pattern``)."""
    capture = _CAPTURES[module]
    generic = capture.generic and dropout == 0.0 and key.shape[-2] == query.shape[-2]
    # Without a mask eager attends everywhere: not causal, so not blocked.
    if generic and attention_mask is not None and capture.causal(attention_mask):
        out, pattern = _blocked(query, key, value, attention_mask, scaling)
    else:
        out, pattern = capture.eager(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    capture.hook(pattern)
    return out, pattern


@dataclass(frozen=True)
class _Capture:
    """What :func:`attention` needs of one module's pass: its bridge's ``hook_pattern``, its
    family's eager function and whether that is Llama's (:func:`_is_generic`), and the pass's
    verdicts of :func:`_causal` by mask (every layer gets the same mask tensor: checked once,
    not per layer, which at 4096 tokens read 64 MB each time)."""

    hook: Callable[[Tensor], Tensor]
    eager: Callable[..., tuple[Tensor, Tensor]]
    generic: bool
    verdicts: dict[int, bool]

    def causal(self, mask: Tensor) -> bool:
        key = id(mask)  # the mask lives as long as the pass, so its id is not reused
        if key not in self.verdicts:
            self.verdicts[key] = _causal(mask)
        return self.verdicts[key]


# Per Hugging Face attention module, while a pass runs.
_CAPTURES: dict[nn.Module, _Capture] = {}


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # the additive [T, T] of eager


def _bridged(component: Any) -> Callable[..., Any]:
    """A forward for the bridge's attention ``component``: its HF module's, then the bridge's
    output hook (``hook_attn_out``)."""
    hf_module = component.original_component

    def forward(*args: Any, **kwargs: Any) -> Any:
        out, *rest = hf_module(*args, **kwargs)  # (output, pattern), as the bridge returns
        return component.hook_out(out), *rest

    return forward


def _attention_components(bridge: Any) -> list[Any] | None:
    """Every block's attention component, or None where one is not the kind this pass can run
    (another bridge class, no eager function in its HF module's file)."""
    blocks = getattr(bridge, "blocks", None)
    if blocks is None:
        return None
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    found: list[Any] = [getattr(block, "attn", None) for block in blocks]
    if any(
        type(c) is not PositionEmbeddingsAttentionBridge  # subclasses may compute otherwise
        or "_original_component" not in c._modules
        or _eager(c.original_component) is None
        for c in found
    ):
        return None
    return found


@contextmanager
def capturing(bridge: Any) -> Iterator[bool]:
    """Within it, ``bridge``'s passes run every attention module as above and fire
    ``hook_pattern`` after the fact; yields False (and changes nothing) for a model it cannot
    serve (another attention bridge class, a model split over devices), whose passes stay
    TransformerLens's."""
    # Split over devices, TransformerLens's forward keeps doing the moves it was tested with.
    components = None if is_dispatched(bridge.original_model) else _attention_components(bridge)
    if components is None:
        yield False
        return
    _register()
    configs = {id(c.original_component.config): c.original_component.config for c in components}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = IMPLEMENTATION
        verdicts: dict[int, bool] = {}
        for c in components:
            # Past the bridge's __setattr__, which hands unknown names to the HF module.
            c.__dict__["forward"] = _bridged(c)
            eager = _eager(c.original_component)
            assert eager is not None  # _attention_components kept only modules with one
            _CAPTURES[c.original_component] = _Capture(
                c.hook_pattern, eager, _is_generic(eager), verdicts
            )
        yield True
    finally:
        for c in components:
            c.__dict__.pop("forward", None)
            _CAPTURES.pop(c.original_component, None)
        for key, config in configs.items():
            config._attn_implementation = saved[key]
