"""The model as transformers runs it, without TransformerLens: the honest baseline of ``bench``.

TransformerLens's bridge swaps every submodule of the Hugging Face model for a wrapper that
exposes hook points, and its attention wrappers compute the softmax eagerly so the pattern can
be hooked. Calling the wrapped model therefore still runs the bridge. The plain model is a second
skeleton of the same class, built on the meta device with the fastest attention implementation
the class supports, whose parameters and buffers *are* the wrapped model's tensors (assigned, not
copied): no extra memory, the same weights, no hooks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from llm_flow.models.dispatch import is_dispatched

_WRAPPER = "._original_component"  # the segment TransformerLens inserts into every module path


def plain_model(wrapped: nn.Module) -> tuple[nn.Module, str] | None:
    """An unhooked Hugging Face model sharing ``wrapped``'s tensors, and the name of its
    attention implementation (sdpa where the class supports it and it runs, else eager); None
    where one cannot be built (a model split over devices: its dispatch hooks live on the
    wrapped modules; a class whose skeleton does not match the wrapped model's tensors)."""
    if is_dispatched(wrapped):
        return None
    tensors = _unwrapped_tensors(wrapped)
    sdpa = getattr(wrapped, "_supports_sdpa", False)
    probe = torch.zeros(1, 2, dtype=torch.long, device=next(iter(tensors.values())).device)
    for attention in ("sdpa", "eager") if sdpa else ("eager",):
        plain = _skeleton(wrapped.config, attention)
        names = set() if plain is None else set(_named_tensors(plain))
        if plain is None or names - set(tensors):
            return None
        for name in names:
            _set(plain, name, tensors[name])
        try:  # some classes declare sdpa yet fail in it (tiny DeepSeek-V2's MLA, measured)
            with torch.inference_mode():
                plain(probe)
        except RuntimeError:
            continue
        return plain.eval(), attention
    return None


def _skeleton(config: Any, attention: str) -> nn.Module | None:
    """An empty (meta) model of ``config``'s class."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:  # a copy: from_config writes the attention implementation into the config it gets
            return AutoModelForCausalLM.from_config(
                copy.deepcopy(config), attn_implementation=attention
            )
        except (ValueError, TypeError, ImportError):
            return None


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by path, tied weights under each of their names."""
    named: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def _unwrapped_tensors(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """``wrapped``'s tensors under the paths the unwrapped class uses."""
    return {name.replace(_WRAPPER, ""): t for name, t in _named_tensors(wrapped).items()}


def _set(module: nn.Module, path: str, tensor: torch.Tensor) -> None:
    *parents, leaf = path.split(".")
    owner: Any = module
    for part in parents:
        owner = getattr(owner, part)
    # The same tensor objects (tied weights stay tied); buffers include the non-persistent ones
    # (rotary frequencies) that a state dict would leave on meta.
    if leaf in owner._parameters:
        owner._parameters[leaf] = tensor
    else:
        owner._buffers[leaf] = tensor
