"""Sparse-autoencoder latents of a residual node: parts, contributions, direct effects, ablation.

An SAE on the hook that reads a residual node writes its state as a sum (see
:mod:`llm_flow.models.sae`): ``x = Σ_i c⁻¹ f_i d_i + c⁻¹ b_dec + ε``, with ``ε = x − x̂`` the
reconstruction error, always one of the parts. Each part gets the route's edge weight, its
proximity to the whole (Ferrando & Voita 2024; :func:`llm_flow.engine.contributions.proximity`)
normalized over all parts, so the contributions of every active latent, ``b_dec`` and ``ε`` sum to
1, and, as every update the lens reads, a direct effect on the logits through the final norm with
the node position's scale frozen (:func:`llm_flow.analyses.lens.direct_logits`): on the logit of
the token the model predicts there and, given a target and a distractor, on their difference.
The parts are built in float64 and checked to sum to the node's state on every call.

Ablating or scaling latents re-runs the model with the residual at the SAE's hook replaced by
``x + (s − 1) Σ_i c⁻¹ f_i d_i`` (s = 0 removes them) at every position, through
:func:`llm_flow.analyses.ablation.ablate`, so the prediction and the route can be compared as for
heads. A latent of ``I{l}`` is edited where layer l + 1 reads it (``hook_resid_pre``): the same
tensor, and there the traced run's identities all hold (the edit enters as that layer's input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llm_flow.analyses.ablation import AblationResult, ablate
from llm_flow.analyses.contrast import contrast_ids
from llm_flow.analyses.interventions import Ablation
from llm_flow.analyses.lens import parse_node, promoted_suppressed, residual_vector
from llm_flow.engine.contributions import normalize, proximity
from llm_flow.engine.trace import Trace
from llm_flow.errors import SaeError, SelfCheckError
from llm_flow.models.base import Hook, TransparentLlm
from llm_flow.models.sae import Sae, hooks_of_node, parse_hook
from llm_flow.validate import check_at_least

RTOL = 1e-6  # Σ parts vs the state, float64 parts of a float32 state
TOKENS_PER_LATENT = 5


@dataclass(frozen=True)
class Latent:
    """One active latent at the node: ``activation`` f_i, its part's ``contribution`` and
    ``direct_effect`` (on the predicted token's logit; ``direct_effect_diff``: on target −
    distractor), and the tokens its part promotes / suppresses most."""

    index: int
    activation: float
    contribution: float
    direct_effect: float
    direct_effect_diff: float | None
    promoted: tuple[str, ...]
    suppressed: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "activation": self.activation,
            "contribution": self.contribution,
            "direct_effect": self.direct_effect,
        }
        if self.direct_effect_diff is not None:
            out["direct_effect_diff"] = self.direct_effect_diff
        return out | {"promoted": list(self.promoted), "suppressed": list(self.suppressed)}


@dataclass(frozen=True)
class Latents:
    """A residual node as SAE parts. ``latents`` are the ``top`` active latents by contribution;
    ``l0`` counts every active one and ``latents_contribution`` is all of theirs together, so
    ``latents_contribution + b_dec_contribution + error_contribution`` = 1.
    ``explained_variance`` is ``1 − ‖ε‖² / ‖x − mean_d(x)‖²`` at this one state."""

    node: str
    hook: str
    predicted_token: str
    latents: tuple[Latent, ...]
    latents_contribution: float
    b_dec_contribution: float
    error_contribution: float
    b_dec_direct_effect: float
    error_direct_effect: float
    explained_variance: float
    l0: int
    b_dec_direct_effect_diff: float | None = None
    error_direct_effect_diff: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``llm-flow latents`` object (docs/architecture.md, "CLI contract")."""
        return {
            "node": self.node,
            "hook": self.hook,
            "predicted_token": self.predicted_token,
            "latents": [latent.to_json() for latent in self.latents],
            "latents_contribution": self.latents_contribution,
            "b_dec_contribution": self.b_dec_contribution,
            "error_contribution": self.error_contribution,
            "b_dec_direct_effect": self.b_dec_direct_effect,
            "error_direct_effect": self.error_direct_effect,
            "explained_variance": self.explained_variance,
            "l0": self.l0,
        } | {
            name: value
            for name, value in (
                ("b_dec_direct_effect_diff", self.b_dec_direct_effect_diff),
                ("error_direct_effect_diff", self.error_direct_effect_diff),
            )
            if value is not None
        }


def check_hook(sae: Sae, kind: str, layer: int, node: str) -> str:
    """The SAE's hook if it reads the node of ``kind`` at ``layer``, else :class:`SaeError`."""
    hooks = hooks_of_node(kind, layer)
    if sae.hook is None:
        return hooks[0]
    if sae.hook not in hooks:
        raise SaeError(f"this SAE reads {sae.hook!r}, not node {node} ({' or '.join(hooks)})")
    return sae.hook


def decompose(sae: Sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The parts of a state ``x`` [D] → (active latent indices [n], their activations [n],
    parts [n + 2, D] float64: each latent's ``c⁻¹ f_i d_i``, then ``c⁻¹ b_dec``, then ``ε``).
    Σ parts = x is checked; :class:`SelfCheckError` otherwise."""
    x64 = x.double()
    acts = sae.encode(x64)  # [d_sae]
    c = sae.input_scale(x64)  # []
    active = acts.nonzero().flatten()
    latent_parts = acts[active, None] * sae.W_dec.double()[active] / c  # [n, D]
    b_dec = sae.b_dec.double() / c
    error = x64 - latent_parts.sum(0) - b_dec
    parts = torch.cat([latent_parts, b_dec[None], error[None]])
    gap = float((parts.sum(0) - x64).abs().max())
    if gap > RTOL * max(float(x64.abs().max()), 1.0):
        raise SelfCheckError(f"SAE parts do not sum to the state (max gap {gap:.3g})")
    return active, acts[active], parts


def latents(
    trace: Trace,
    node: str,
    sae: Sae,
    *,
    top: int = 20,
    target: str | None = None,
    distractor: str | None = None,
) -> Latents:
    """The residual ``node`` (``X0_t``, ``A{l}_t`` or ``I{l}_t``) as ``sae``'s parts (see the
    module); ``top`` latents listed, by contribution."""
    check_at_least("--top", top, 1)
    run, llm = trace.run, trace.llm
    parsed = parse_node(node, run.n_layers, run.n_tokens)
    hook = check_hook(sae, parsed.kind, parsed.layer, node)
    x = residual_vector(run, node)  # [D]
    if x.shape[-1] != sae.d_in:
        raise SaeError(f"the SAE reads {sae.d_in}-dimensional states; this model's are {len(x)}")
    t = parsed.token
    active, acts, parts = decompose(sae, x)
    contributions = normalize(proximity(x.double(), parts))  # [n + 2]
    predicted = trace.prediction(t)
    ids = [predicted.id]
    if target is not None or distractor is not None:
        if target is None or distractor is None:
            raise SaeError("a target and a distractor go together; give both or neither")
        ids += list(contrast_ids(llm, target, distractor))
    normed = llm.final_norm_linear(parts.float(), run.final_scale[t])  # [n + 2, D]
    W_U = llm.W_U
    effects = (normed.to(W_U.dtype) @ W_U[:, ids]).double()  # [n + 2, 1 or 3]
    diff = effects[:, 1] - effects[:, 2] if len(ids) == 3 else None
    n = len(active)
    order = contributions[:n].argsort(descending=True)[:top].tolist()
    table = torch.stack([active.double(), acts, contributions[:n], effects[:n, 0]], 1).tolist()
    diffs = None if diff is None else diff.tolist()
    listed = []
    for i in order:
        up, down = promoted_suppressed(trace, parts[i].float(), t, k=TOKENS_PER_LATENT)
        index, activation, contribution, effect = table[i]
        listed.append(
            Latent(
                index=int(index),
                activation=activation,
                contribution=contribution,
                direct_effect=effect,
                direct_effect_diff=None if diffs is None else diffs[i],
                promoted=tuple(s.token for s in up),
                suppressed=tuple(s.token for s in down),
            )
        )
    rest = contributions.tolist()
    error = parts[-1]
    centred = x.double() - x.double().mean()
    return Latents(
        node=node,
        hook=hook,
        predicted_token=predicted.token,
        latents=tuple(listed),
        latents_contribution=float(contributions[:n].sum()),
        b_dec_contribution=rest[n],
        error_contribution=rest[n + 1],
        b_dec_direct_effect=float(effects[n, 0]),
        error_direct_effect=float(effects[n + 1, 0]),
        explained_variance=float(1 - error.pow(2).sum() / centred.pow(2).sum().clamp_min(1e-300)),
        l0=n,
        b_dec_direct_effect_diff=None if diffs is None else diffs[n],
        error_direct_effect_diff=None if diffs is None else diffs[n + 1],
    )


# -- ablating and scaling latents --------------------------------------------------------------


def edit_hook(llm: TransparentLlm, sae: Sae) -> str:
    """Where to edit the residual ``sae`` reads so a traced run stays exact: ``I{l}``'s at layer
    l + 1's input; ``X0`` at layer 0's input. A middle residual (``A{l}``) or the last layer's
    output has no such place: :class:`SaeError`."""
    if sae.hook is None:
        raise SaeError(f"{sae.source}: the SAE names no hook; load it with hook=…")
    layer, kind = parse_hook(sae.hook)
    if kind == "post" and layer + 1 < llm.info.n_layers:
        return f"blocks.{layer + 1}.hook_resid_pre"
    if kind == "pre" and layer < llm.info.n_layers:
        return sae.hook
    raise SaeError(
        f"latents on {sae.hook!r} cannot be ablated: llm-flow edits a residual where the next "
        "layer reads it, and this one is read inside a layer (or by the final norm)"
    )


def latent_hooks(llm: TransparentLlm, sae: Sae, indices: Sequence[int], scale: float) -> list[Hook]:
    """A forward hook that scales the parts of latents ``indices`` by ``scale`` (0: removes
    them) at every position: adds ``(scale − 1) Σ_i c⁻¹ f_i d_i`` to the residual."""
    bad = [i for i in indices if not 0 <= i < sae.d_sae]
    if bad or not indices:
        raise SaeError(f"latent indices must be in 0..{sae.d_sae - 1}, got {list(indices)}")
    picked = torch.tensor(sorted(set(indices)))

    def hook(tensor: Tensor, hook: Any) -> Tensor:
        x = tensor[0].double()  # [T, D]
        acts = sae.encode(x)[:, picked]  # [T, n]
        delta = (acts @ sae.W_dec.double()[picked]) / sae.input_scale(x)[:, None]
        return tensor + ((scale - 1) * delta).to(tensor)[None]

    name: str = edit_hook(llm, sae)
    fn: Callable[..., Any] = hook
    return [(name, fn)]


def parse_latents(text: str) -> tuple[str, tuple[int, ...]]:
    """``HOOK:I,J,…`` (e.g. ``blocks.3.hook_resid_post:12,40``) → (hook, indices)."""
    hook, sep, rest = text.partition(":")
    try:
        indices = tuple(int(i) for i in rest.split(",") if i.strip())
    except ValueError:
        indices = ()
    if not sep or not indices:
        raise SaeError(
            f"--latents {text!r}: expected HOOK:I,J,… e.g. blocks.3.hook_resid_post:12,40"
        )
    parse_hook(hook)
    return hook, indices


def ablate_latents(
    trace: Trace,
    sae: Sae,
    indices: Sequence[int],
    *,
    scale: float = 0.0,
    target_id: int | None = None,
    distractor_id: int | None = None,
    position: int = -1,
    k: int = 5,
    traced: bool = False,
) -> AblationResult:
    """The prediction after ``position`` before and with the parts of latents ``indices`` scaled
    by ``scale`` (see :func:`latent_hooks`); ``traced`` also traces the edited run, for
    :meth:`AblationResult.route_diff`."""
    return ablate(
        trace,
        Ablation(),
        hooks=latent_hooks(trace.llm, sae, indices, scale),
        target_id=target_id,
        distractor_id=distractor_id,
        position=position,
        k=k,
        traced=traced,
    )
