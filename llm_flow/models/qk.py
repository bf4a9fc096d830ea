"""One attention layer's queries, keys and scores, and its query/key and value maps with every
norm's scale frozen: what QK attribution (:mod:`llm_flow.analyses.attend`) and the latents of an
attention edge (:mod:`llm_flow.analyses.edge_latents`) decompose.

With the per-token scale of the pre-attention norm and of any q/k norm frozen to the ones the
model used, the path from a residual vector to the query (projection, q-norm, rotary) is affine
per position, so the query of a sum of parts is the sum of the parts' queries plus a constant
(docs: ARCHITECTURE, "QK attribution"); so are the values (a latent-attention model's latent
norm frozen too). Nothing here recomputes rotary, norms or masks: the layer's own
TransformerBridge attention runs on a batch of parts, its norms' ``hook_scale`` replaced by the
scales of the model's pass, and stops once the queries and keys (or the values) exist.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_flow.errors import SelfCheckError, UnsupportedAnalysisError
from llm_flow.models.checks import RTOL, relative_error
from llm_flow.models.weights import norm_affine

# Where the model's queries and keys are, per kind of attention bridge (after ``attn.``).
_GRABS = {
    "q": "hook_q",
    "k": "hook_k",
    "v": "hook_v",
    "rot_q": "hook_rot_q",
    "rot_k": "hook_rot_k",
    "q_normed": "hook_q_normed",
    "k_normed": "hook_k_normed",
    "cos": "hook_cos",
    "sin": "hook_sin",
    "scores": "hook_attn_scores",
    "pattern": "hook_pattern",
    "attn_in": "hook_in",
}

_NOT_PASSED = {"hidden_states", "cache", "past_key_values", "past_key_value", "layer_past"}


class _Stop(Exception):
    """Ends a pass once what it was run for is captured."""


def _stop(tensor: Tensor, hook: Any) -> None:
    raise _Stop


@dataclass(frozen=True)
class QkCapture:
    """What one attention layer computed for one prompt (T tokens), batch dimension removed, and
    its affine residual → (query, key) map at the frozen norm scales of that pass."""

    queries: Tensor  # [T, H, d_qk] as they enter the score: after q-norm and rotary
    keys: Tensor  # [T, H_kv, d_qk]
    scores: Tensor  # [H, T, T] pre-softmax, float32; -inf where masked
    pattern: Tensor  # [H, T, T]
    scale: float  # the bilinear part of a score is q · k · scale
    bilinear: bool  # False: softcapping or ALiBi adds what q · k · scale does not hold
    # Residual vectors [N, T, D] (part n at every position) → (queries [N, T, H, d_qk],
    # keys [N, T, H_kv, d_qk]), affine: the image of zeros is the norm and projection biases.
    project: Callable[[Tensor], tuple[Tensor, Tensor]] = field(compare=False, repr=False)
    # Residual vectors [N, T, D] → values [N, T, H, d_head] per query head (as LayerRun.values),
    # affine the same way.
    project_values: Callable[[Tensor], Tensor] = field(compare=False, repr=False)


def capture(
    bridge: Any,
    token_ids: Sequence[int],
    layer: int,
    input_device: torch.device,
    lock: AbstractContextManager[Any],
) -> QkCapture:
    """One pass over ``token_ids`` that stops after ``layer``'s attention, capturing its queries,
    keys, scores and norm scales (see :class:`QkCapture`). The capture's ``project`` holds
    ``lock`` (the model's one-pass-at-a-time lock) while its hooks are attached."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    block = bridge.blocks[layer]
    attn = block.attn
    architecture = str(bridge.cfg.architecture)
    prefix = f"blocks.{layer}."
    names = set(bridge.hook_dict)
    got: dict[str, Any] = {}

    def grab(key: str) -> Callable[[Tensor, Any], None]:
        def hook(tensor: Tensor, hook: Any) -> None:
            got[key] = tensor.detach().clone()

        return hook

    def call(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["args"], got["kwargs"] = args, dict(kwargs)

    scale_hooks = sorted(
        n[len(prefix) :]
        for n in names
        if n.startswith(prefix + "attn.") and n.endswith(".hook_scale")
    )
    hooks = [(f"{prefix}attn.{h}", grab(k)) for k, h in _GRABS.items()]
    hooks += [(prefix + h, grab(h)) for h in ("hook_resid_pre", "ln1.hook_scale", *scale_hooks)]
    hooks = [(n, fn) for n, fn in hooks if n in names]
    hooks.append((prefix + "hook_resid_post", _stop))  # delegated attention: pattern after out
    handle = attn.register_forward_pre_hook(call, with_kwargs=True)
    try:
        with contextlib.suppress(_Stop), torch.inference_mode():
            bridge.run_with_hooks(
                torch.tensor([list(token_ids)], device=input_device), fwd_hooks=hooks
            )
    finally:
        handle.remove()
    # Attention run inside the HF module (GPT-J, OPT): TransformerLens fires hook_attn_scores
    # after the fact, with the post-softmax pattern in it.
    delegated = type(attn).forward is AttentionBridge.forward or "scores" not in got
    if (
        delegated
        and f"{prefix}attn.hook_rot_q" in names
        and _hf_rotary(attn.original_component, got["kwargs"]) is None
    ):
        raise UnsupportedAnalysisError(
            f"QK attribution is not supported for {architecture}: its attention runs inside the "
            "Hugging Face module, which rotates queries and keys where TransformerLens shows "
            "neither the rotated vectors nor the pre-softmax scores"
        )
    queries, keys, rotary = _final_qk(attn, got, bridge.cfg)
    hidden = _attention_input(block, got, architecture)
    frozen = {prefix + h: got[h] for h in scale_hooks if h in got}  # the norms that ran
    hf_attn = attn.original_component
    softcap = getattr(hf_attn, "attn_logit_softcapping", None)
    alibi = any(key in got["kwargs"] for key in ("alibi", "position_bias"))
    if delegated:
        scale = _scale(hf_attn, queries, keys, None)
        scores = _scores_of_pattern(queries, keys, scale, got["pattern"][0], architecture)
    else:
        raw = got["scores"][0]
        # Masked entries are -inf, whatever the mask's dtype wrote (a half model's -65504 too).
        scores = raw.float().masked_fill(raw <= torch.finfo(raw.dtype).min / 2, -torch.inf)
        scale = _scale(hf_attn, queries, keys, scores)

    n_heads, latent = int(got["pattern"].shape[1]), hasattr(attn, "hook_kv_latent")

    def run_parts(parts: Tensor, sources: tuple[str, ...]) -> dict[str, Tensor]:
        """The attention's hooks ``sources`` (keys of _GRABS) on a batch of residual parts."""
        x = hidden(parts)
        args = got["args"][1:]
        # No cache: the pass's own would grow by the parts' keys.
        kwargs = {k: v for k, v in got["kwargs"].items() if k not in _NOT_PASSED}
        kwargs |= {"use_cache": False} if "use_cache" in kwargs else {}
        out: dict[str, Tensor] = {}

        def keep(key: str) -> Callable[[Tensor, Any], None]:
            def hook(tensor: Tensor, hook: Any) -> None:
                out[key] = tensor.detach()
                if len(out) == len(sources):  # no [N, H, T, T] scores are computed
                    raise _Stop

            return hook

        def freeze(value: Tensor) -> Callable[[Tensor, Any], Tensor]:
            return lambda tensor, hook: value.to(tensor).expand_as(tensor)

        run_hooks: list[tuple[str, Callable[[Tensor, Any], Tensor | None]]] = [
            (name, freeze(value)) for name, value in frozen.items()
        ]
        run_hooks += [(f"{prefix}attn.{_GRABS[k]}", keep(k)) for k in sources]

        def run(batch: Tensor) -> dict[str, Tensor]:
            out.clear()
            hooked = bridge.hooks(fwd_hooks=run_hooks)
            with hooked, contextlib.suppress(_Stop), warnings.catch_warnings():
                # A frozen scale is an edit, on purpose: TransformerLens warns of each one.
                warnings.filterwarnings("ignore", message=".*edited hook_scale")
                attn(batch, *args, **kwargs)
            return dict(out)

        with lock, torch.inference_mode():  # the hooks are on modules other passes share
            try:
                return run(x)
            except RuntimeError:  # arguments shaped for one sequence (ALiBi, caches): one by one
                one = [run(x[n : n + 1]) for n in range(x.shape[0])]
                return {key: torch.cat([o[key] for o in one]) for key in sources}

    def project(parts: Tensor) -> tuple[Tensor, Tensor]:
        return rotary.apply(attn, run_parts(parts, rotary.sources))

    def project_values(parts: Tensor) -> Tensor:
        return value_heads(run_parts(parts, ("v",))["v"], n_heads, latent=latent)

    return QkCapture(
        queries=queries,
        keys=keys,
        scores=scores,
        pattern=got["pattern"][0],
        scale=scale,
        bilinear=softcap is None and not alibi,
        project=project,
        project_values=project_values,
    )


def value_heads(values: Tensor, n_heads: int, *, latent: bool) -> Tensor:
    """``hook_v``'s values [..., T, H_kv, d] (latent attention's: [..., H, T, d]) as one slice
    per query head [..., T, H, d]: grouped-query K/V heads expanded to the heads sharing them."""
    if latent:
        values = values.transpose(-3, -2)
    if values.shape[-2] != n_heads:
        values = values.repeat_interleave(n_heads // values.shape[-2], dim=-2)
    return values


@dataclass(frozen=True)
class _Rotary:
    """Which captured hooks hold the final queries and keys, and how to finish them."""

    sources: tuple[str, str]  # keys of _GRABS: (query, key)
    layout: str  # "bthd" or "bhtd" as the hooks see them
    cos_sin: tuple[Tensor, Tensor] | None  # rotary still to apply with the bridge's own code
    rotate: Callable[[Tensor], Tensor] | None = None  # or with the HF module's, on [B, T, n, d]

    def apply(self, attn: Any, got: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(queries [B, T, H, d], keys [B, T, H_kv, d]) from captured hooks."""
        q, k = (_heads(got[s], n, attn) for s, n in zip(self.sources, ("q", "k"), strict=True))
        if self.layout == "bhtd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.cos_sin is not None:
            cos, sin = self.cos_sin
            q, k = attn._apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rotate is not None:
            q, k = self.rotate(q), self.rotate(k)
        return q, k


def _heads(x: Tensor, which: str, attn: Any) -> Tensor:
    """A flat [B, T, n · d] projection as [B, T, n, d] (per-head hooks pass through)."""
    if x.ndim == 4:
        return x
    n = int(
        attn.config.n_heads
        if which == "q"
        else attn.config.n_key_value_heads or attn.config.n_heads
    )
    return x.unflatten(-1, (n, -1))


def _final_qk(attn: Any, got: dict[str, Any], cfg: Any) -> tuple[Tensor, Tensor, _Rotary]:
    """The model's queries [T, H, d] and keys [T, H_kv, d] as they enter the score, and how the
    same stage is read off a pass on parts."""
    if getattr(cfg, "qk_norm_after_rope", False) and "q_normed" in got:  # HunYuan
        rotary = _Rotary(("q_normed", "k_normed"), "bhtd", None)
    elif hasattr(attn, "hook_kv_latent"):
        # Latent attention (DeepSeek V2/V3): hook_q/hook_k hold the up-projected part and the
        # rotated part (the key's shared by every head) concatenated, as they enter the score.
        rotary = _Rotary(("q", "k"), "bhtd", None)
    elif "rot_q" in got:
        rotary = _Rotary(("rot_q", "rot_k"), "bthd", None)
    elif "cos" in got and hasattr(attn, "_apply_rotary_pos_emb"):  # fused q/k/v with rotary
        rotary = _Rotary(("q", "k"), "bthd", (got["cos"], got["sin"]))
    elif (rotate := _hf_rotary(attn.original_component, got["kwargs"])) is not None:
        rotary = _Rotary(("q", "k"), "bthd", None, rotate)
    else:
        rotary = _Rotary(("q", "k"), "bthd", None)
    q, k = rotary.apply(attn, got)
    return q[0], k[0], rotary


def _hf_rotary(hf_attn: Any, kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor] | None:
    """GPT-J's rotary, applied inside its HF module where no hook sees it: that module's own
    ``apply_rotary_pos_emb(tensor, sin, cos)`` on its first ``rotary_dim`` dimensions, with the
    (sin, cos) its model passed in. None for any other module."""
    module = importlib.import_module(type(hf_attn).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    sin_cos = kwargs.get("position_embeddings")
    if apply is None or sin_cos is None or not hasattr(hf_attn, "rotary_dim"):
        return None
    if list(inspect.signature(apply).parameters)[:3] != ["tensor", "sin", "cos"]:
        return None
    sin, cos = sin_cos
    n = hf_attn.rotary_dim or hf_attn.head_dim

    def rotate(x: Tensor) -> Tensor:  # [B, T, n_heads, d]
        return torch.cat([apply(x[..., :n], sin, cos), x[..., n:]], dim=-1)

    return rotate


def _attention_input(
    block: Any, got: dict[str, Any], architecture: str
) -> Callable[[Tensor], Tensor]:
    """The pre-attention norm as an affine map at the pass's frozen per-token scale (identity
    for blocks without one), checked against what the attention actually received
    (:class:`SelfCheckError` if it differs)."""
    resid = got["hook_resid_pre"][0]  # [T, D]
    if hasattr(block, "ln1"):
        d_model = resid.shape[-1]
        gain, bias = norm_affine(block.ln1, d_model, resid.dtype, resid.device)
        with torch.no_grad():  # LayerNorm maps a constant vector to b, RMSNorm to ≈ g + b
            const = block.ln1(torch.ones(1, d_model, dtype=resid.dtype, device=resid.device))[0]
        centred = bool((const - bias).norm() < (const - gain - bias).norm())
        scale = got["ln1.hook_scale"][0]  # [T, 1]

        def hidden(x: Tensor) -> Tensor:
            x = x.to(device=resid.device, dtype=torch.float32)  # the norm's own precision
            if centred:
                x = x - x.mean(-1, keepdim=True)
            return (x * gain.float() / scale.float() + bias.float()).to(resid.dtype)

    else:

        def hidden(x: Tensor) -> Tensor:
            return x.to(resid)

    seen = got["attn_in"][0]
    rtol = RTOL.get(resid.dtype, 1e-4)
    if seen.shape != resid.shape or not relative_error(hidden(resid[None])[0], seen) <= rtol:
        raise SelfCheckError(
            f"QK attribution self-check failed for {architecture}: the pre-attention norm at "
            "the pass's frozen scales does not give the attention's input; nothing is shown — "
            "please report this model/architecture"
        )
    return hidden


def _dots(queries: Tensor, keys: Tensor) -> Tensor:
    """``q_t · k_s`` of every head → [H, T, T] float32 (K heads shared by their query group)."""
    k = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # [T, H, d]
    return torch.einsum("thd,shd->hts", queries.float(), k.float())


def _scale(hf_attn: Any, queries: Tensor, keys: Tensor, scores: Tensor | None) -> float:
    """The factor of q · k in a score: the module's own (``scaling``, ``softmax_scale``,
    ``inv_norm_factor``), else read off the scores by least squares over the unmasked entries
    (1/√d without scores)."""
    for name in ("scaling", "softmax_scale", "inv_norm_factor"):
        value = getattr(hf_attn, name, None)
        if isinstance(value, int | float):
            return float(value)
    if scores is None:
        return float(queries.shape[-1]) ** -0.5
    dots, seen = _dots(queries, keys), scores.isfinite()
    return float((scores[seen] * dots[seen]).sum() / (dots[seen] ** 2).sum().clamp_min(1e-30))


def _scores_of_pattern(
    queries: Tensor, keys: Tensor, scale: float, pattern: Tensor, architecture: str
) -> Tensor:
    """Pre-softmax scores [H, T, T] of attention TransformerLens shows only as its pattern:
    ``q · k · scale`` of the model's own queries and keys, -inf where the pattern is 0, checked
    to give the model's pattern back through the softmax (:class:`SelfCheckError` if not)."""
    scores = (_dots(queries, keys) * scale).masked_fill(pattern == 0, -torch.inf)
    err = relative_error(scores.softmax(-1).nan_to_num(), pattern)
    rtol = 10 * RTOL.get(pattern.dtype, 1e-4)  # an exp amplifies the scores' rounding
    if not err <= rtol:
        raise SelfCheckError(
            f"QK attribution self-check failed for {architecture}: q · k · scale of the model's "
            f"own queries and keys does not give its attention pattern (relative error "
            f"{err:.2e} > {rtol:.0e}); nothing is shown — please report this model/architecture"
        )
    return scores
