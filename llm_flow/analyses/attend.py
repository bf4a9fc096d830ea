"""Why does attention head h of layer l attend from token t to token s? QK attribution.

The pre-softmax score of the edge is ``q_t · k_s · scale``. Everything the residual stream holds at
a position is a sum of parts written by earlier components (Elhage et al. 2021, "A Mathematical
Framework for Transformer Circuits": the residual stream as a sum; the same parts the route's
edges are made of): the embedding ``X0_p``, each head of each earlier layer ``A{l'}_p.h{k}``, each
earlier FFN block ``M{l'}_p``, and the attention output biases (``bias``). With the per-token
scale of the pre-attention norm and of any q/k norm frozen to the model's (as the direct-logit
lens freezes the final norm), the map from the residual to the query is affine: rotary is linear
per position, so ``q_t = Σ_i q_i`` with ``q_i`` the image of part i at t, the norm and projection
biases going to ``bias``; likewise ``k_s = Σ_j k_j``. So

    score = Σ_{i,j} q_i · k_j · scale   (+ softcapping / ALiBi, which are not bilinear)

exactly. Query-side terms are ``q_i · k_s · scale``, key-side terms ``q_t · k_j · scale``, pairs
``q_i · k_j · scale``. The **contrast** asks "why s rather than the other visible sources": the
score of s minus the mean score of the sources s' ≤ t the head can see, s' ≠ s, split the same
way with ``k_j(s) − mean_{s'} k_j(s')`` on the key side.

Every call checks itself: Σ q_i is the model's own query, Σ k_j its keys and Σ terms its own
score (where the score is bilinear), or :class:`~llm_flow.errors.SelfCheckError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from llm_flow.engine.nodes import NodeKind, node_id
from llm_flow.engine.trace import Trace
from llm_flow.errors import AttendError, PositionError, SelfCheckError
from llm_flow.models.base import LayerRun, ModelRun
from llm_flow.models.checks import RTOL, relative_error
from llm_flow.validate import check_at_least, check_position

TOP = 20
REMAINDER = "position/softcap"  # the non-bilinear part of a score (ALiBi, softcapping)
PARTS_PER_PASS = 64  # residual parts projected at once: bounds the memory of a long prompt


@dataclass(frozen=True)
class Term:
    """One component's share of a score."""

    component: str
    value: float


@dataclass(frozen=True)
class Pair:
    """One (query component, key component) pair's share of a score."""

    query_component: str
    key_component: str
    value: float


@dataclass(frozen=True)
class ScoreSplit:
    """A score and its largest terms. ``terms_sum`` is the bilinear sum over *all* terms (the
    lists hold the ``top`` largest by magnitude); ``remainder = score − terms_sum`` is what
    softcapping or ALiBi add (rounding alone where the score is bilinear)."""

    score: float
    terms_sum: float
    query_terms: tuple[Term, ...]
    key_terms: tuple[Term, ...]
    pairs: tuple[Pair, ...]

    @property
    def remainder(self) -> float:
        return self.score - self.terms_sum

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "terms_sum": self.terms_sum,
            "remainder": self.remainder,
            "query_terms": [{"component": t.component, "value": t.value} for t in self.query_terms],
            "key_terms": [{"component": t.component, "value": t.value} for t in self.key_terms],
            "pairs": [
                {
                    "query_component": p.query_component,
                    "key_component": p.key_component,
                    "value": p.value,
                }
                for p in self.pairs
            ],
        }


@dataclass(frozen=True)
class Attend:
    """QK attribution of one attention edge (layer, head, query t, source s).

    ``direct`` splits the pre-softmax score; ``contrast`` splits the score minus the mean score
    of the ``others`` other sources the head sees from t (None when s is the only one).
    ``bilinear`` is False where softcapping or ALiBi make the score more than ``q · k · scale``:
    the lists then end with a ``position/softcap`` term holding the remainder.
    """

    layer: int
    head: int
    kv_head: int
    query: int
    source: int
    query_token: str
    source_token: str
    attention: float  # the attention weight A[head, query, source]
    scale: float
    bilinear: bool
    direct: ScoreSplit
    contrast: ScoreSplit | None
    others: int

    def to_json(self) -> dict[str, Any]:
        """``llm-flow attend``'s JSON: the edge, its attention weight, the score split and the
        ``"contrast"`` block (same fields, or null)."""
        return {
            "layer": self.layer,
            "head": self.head,
            "kv_head": self.kv_head,
            "query": self.query,
            "source": self.source,
            "query_token": self.query_token,
            "source_token": self.source_token,
            "attention": self.attention,
            "scale": self.scale,
            "bilinear": self.bilinear,
            **self.direct.to_json(),
            "contrast": None
            if self.contrast is None
            else {"others": self.others, **self.contrast.to_json()},
        }


class _Part(NamedTuple):
    """A residual part: ``X`` the embedding, ``A`` a head, ``M`` an FFN block (or one of its
    experts), ``bias``; ``suffix`` names the head (``.h2``) or expert (``.e7``, ``.shared``)."""

    kind: Literal["X", "A", "M", "bias"]
    layer: int = 0
    suffix: str = ""

    def name(self, position: int) -> str:
        if self.kind == "bias":
            return "bias"
        kind: NodeKind = self.kind
        return node_id(kind, self.layer, position) + self.suffix


def residual_parts(
    run: ModelRun, layer: int, rows: int, *, experts: bool = False
) -> Iterator[tuple[list[_Part], Tensor]]:
    """The parts of the residual entering ``layer`` at positions ``0..rows-1``, a block at a
    time so that memory stays one layer's worth: the embedding [1, rows, D] first, then each
    earlier layer's heads and FFN block [H + 1, rows, D] (with ``experts``, a mixture of
    experts' block as one part per expert routed to at some position, and its shared expert),
    the biases (attention output biases, post-norm scales folded as the graph's parts) last;
    float32. They sum to the residual."""
    f32 = torch.float32
    at = torch.arange(rows)
    run = run.with_attention({earlier: at for earlier in range(layer)}) if layer else run
    embedding = run.layers[0].resid_pre[:rows].to(f32)
    yield [_Part("X")], embedding[None]
    bias = torch.zeros_like(embedding)
    for lr in run.layers[:layer]:
        pattern = lr.attention_at(at)[:, :, :rows].to(f32)  # [H, R, R]: causal
        mixed = torch.einsum("hts,shk->thk", pattern, lr.values[:rows].to(f32))  # [R, H, d]
        W_O = lr.W_O.to(device=mixed.device, dtype=f32)
        scale = lr.attn_scale[:rows].to(f32)[:, None]
        heads = torch.einsum("thk,hkd->htd", mixed, W_O) * scale  # [H, R, D]
        bias = bias + lr.token_b_O[:rows].to(f32) * scale
        ffn_parts, ffn = [_Part("M", lr.index)], lr.mlp_update[:rows].to(f32)[None]
        if experts and lr.experts is not None:
            ffn_parts, ffn = _expert_parts(lr, rows)
            bias = bias + lr.mlp_update[:rows].to(f32) - ffn.sum(0)  # the block's own bias
        parts = [_Part("A", lr.index, f".h{h}") for h in range(heads.shape[0])]
        yield parts + ffn_parts, torch.cat([heads, ffn])
    yield [_Part("bias")], bias[None]


def _expert_parts(lr: LayerRun, rows: int) -> tuple[list[_Part], Tensor]:
    """A mixture-of-experts block's parts at positions ``0..rows-1``: each expert routed to at
    one of them (router weight and post-norm scale folded), then the shared expert → [E', R, D]."""
    ex = lr.experts
    assert ex is not None
    at = torch.arange(rows, device=ex.index.device)
    scale = lr.mlp_scale[:rows].float()[:, None]
    slots = ex.slot_outputs(rows=at)  # [R, k, D]
    index = ex.index[:rows]  # [R, k]
    chosen = index.unique().tolist()
    parts = [_Part("M", lr.index, f".e{e}") for e in chosen]
    tensors = [(slots * (index == e)[..., None]).sum(1) * scale for e in chosen]
    shared = ex.shared_output(rows=at)
    if shared is not None:
        parts.append(_Part("M", lr.index, ".shared"))
        tensors.append(shared * scale)
    return parts, torch.stack(tensors).to(lr.resid_pre.device)


def _check(what: str, parts_sum: Tensor, whole: Tensor, dtype: torch.dtype) -> None:
    rtol = RTOL.get(dtype, 1e-4)
    err = relative_error(parts_sum, whole)
    if not err <= rtol:  # also catches NaN
        raise SelfCheckError(
            f"QK attribution self-check failed at {what} (relative error {err:.2e} > "
            f"{rtol:.0e}); nothing is shown — please report this model/architecture"
        )


def _index(what: str, value: int, size: int) -> int:
    if not -size <= value < size:
        raise AttendError(
            f"{what} {value} is out of range; valid {what}s are 0..{size - 1} "
            f"(or -{size}..-1 counting from the end)"
        )
    return value % size


def _position(what: str, position: int, n_tokens: int) -> int:
    try:
        return check_position(position, n_tokens)
    except PositionError as exc:  # say which of the two positions it was
        raise PositionError(f"{what} {exc}") from None


def attend(
    trace: Trace,
    layer: int,
    head: int,
    query: int,
    source: int,
    *,
    top: int | None = TOP,
    experts: bool = False,
) -> Attend:
    """QK attribution of head ``head`` of ``layer`` attending from position ``query`` to
    ``source`` (negative positions count from the end; ``source ≤ query``): the score split over
    query-side, key-side and paired components, and the same for the contrast with the other
    sources. ``top`` terms per list (None: all); ``experts`` splits mixture-of-experts FFN
    blocks into their experts (``M4_5.e7``, ``M4_5.shared``). One extra forward pass, stopped at
    ``layer``."""
    llm, run = trace.llm, trace.run
    info = llm.info
    layer = _index("layer", layer, run.n_layers)
    head = _index("head", head, info.n_heads)
    t, s = _position("query", query, run.n_tokens), _position("source", source, run.n_tokens)
    if s > t:
        raise AttendError(
            f"source {s} comes after query {t}; a token attends only to itself and earlier "
            "tokens, so give a source ≤ the query"
        )
    if top is not None:
        check_at_least("top", top, 1)
    cap = llm.qk_capture(run.token_ids, layer)
    device = run.layers[layer].resid_pre.device
    g = head // (cap.queries.shape[1] // cap.keys.shape[1])
    dtype = run.layers[layer].resid_pre.dtype
    row = cap.scores[head, t, : t + 1].to(device)  # [t + 1]
    seen = row.isfinite()
    if not bool(seen[s]):
        raise AttendError(
            f"head {head} of layer {layer} cannot see source {s} from query {t} (outside its "
            "attention window); pick a source it sees"
        )
    parts, q_parts, k_parts = _project(cap.project, run, layer, t, head, g, experts)
    _check(
        f"layer {layer} head {head}: Σ query parts ≠ the model's query",
        q_parts.sum(0),
        cap.queries[t, head].to(device),
        dtype,
    )
    _check(
        f"layer {layer} kv head {g}: Σ key parts ≠ the model's keys",
        k_parts.sum(0),
        cap.keys[: t + 1, g].to(device),
        dtype,
    )
    q64, k64 = q_parts.double(), k_parts.double()
    names_q = [p.name(t) for p in parts]
    names_k = [p.name(s) for p in parts]
    direct = _split(float(row[s]), q64, k64[:, s], cap.scale, names_q, names_k, top, cap.bilinear)
    if cap.bilinear:
        # A dot product's rounding scales with |q| |k|, not with the score (Higham §3.1).
        size = float(q64.sum(0).norm() * k64[:, s].sum(0).norm()) * abs(cap.scale)
        _check_score(layer, head, direct, max(size, float(row[seen].abs().max())), dtype)
    others = seen.clone()
    others[s] = False
    contrast = None
    if bool(others.any()):
        k_diff = k64[:, s] - k64[:, others].mean(1)
        score = float(row[s] - row[others].mean())
        contrast = _split(score, q64, k_diff, cap.scale, names_q, names_k, top, cap.bilinear)
    return Attend(
        layer=layer,
        head=head,
        kv_head=g,
        query=t,
        source=s,
        query_token=trace.tokens[t],
        source_token=trace.tokens[s],
        attention=float(cap.pattern[head, t, s]),
        scale=cap.scale,
        bilinear=cap.bilinear,
        direct=direct,
        contrast=contrast,
        others=int(others.sum()),
    )


def _project(
    project: Any, run: ModelRun, layer: int, t: int, head: int, g: int, experts: bool
) -> tuple[list[_Part], Tensor, Tensor]:
    """Every residual part, its query at t for ``head`` [N, d] and its keys at 0..t for kv head
    ``g`` [N, t+1, d] (float32): its image under the layer's affine map minus the map's
    constant, which goes to the last part (``bias``) with the biases' own image. Checks that
    the parts sum to the residual."""
    resid = run.layers[layer].resid_pre
    rows, (n_tokens, d_model) = t + 1, resid.shape
    blank = torch.zeros(1, n_tokens, d_model, device=resid.device)
    q0, k0 = (x[0].float().to(resid.device) for x in project(blank))  # the map's constant
    q0, k0 = q0[t, head], k0[:rows, g]
    parts: list[_Part] = []
    qs, ks, total = [], [], torch.zeros(rows, d_model, device=resid.device)
    for block_parts, block in residual_parts(run, layer, rows, experts=experts):
        parts += block_parts
        total += block.sum(0)
        for chunk in block.split(PARTS_PER_PASS):
            padded = blank.expand(len(chunk), -1, -1).clone()
            padded[:, :rows] = chunk  # later positions stay zero: causal, never read
            q, k = project(padded)
            qs.append(q[:, t, head].float().to(resid.device) - q0)
            ks.append(k[:, :rows, g].float().to(resid.device) - k0)
    _check(f"layer {layer}: Σ residual parts ≠ the residual", total, resid[:rows], resid.dtype)
    q_parts, k_parts = torch.cat(qs), torch.cat(ks)  # [N, d], [N, t + 1, d]
    q_parts[-1] += q0
    k_parts[-1] += k0
    return parts, q_parts, k_parts


def _check_score(layer: int, head: int, split: ScoreSplit, size: float, dtype: Any) -> None:
    """Σ terms = the model's own score, relative to ``size`` (the score's natural scale)."""
    rtol = RTOL.get(dtype, 1e-4)
    err = abs(split.remainder) / max(size, 1e-12)
    if not err <= rtol:
        raise SelfCheckError(
            f"QK attribution self-check failed at layer {layer} head {head}: Σ terms ≠ the "
            f"model's score (relative error {err:.2e} > {rtol:.0e}); nothing is shown — please "
            "report this model/architecture"
        )


def _split(
    score: float,
    q_parts: Tensor,
    k: Tensor,
    scale: float,
    names_q: list[str],
    names_k: list[str],
    top: int | None,
    bilinear: bool,
) -> ScoreSplit:
    """``score`` split over ``q_parts`` [N, d] · ``k`` [N, d] (key parts, or their contrast)."""
    pairs = q_parts @ k.T * scale  # [N, N] float64
    total = float(pairs.sum())
    extra = () if bilinear else (Term(REMAINDER, score - total),)
    return ScoreSplit(
        score=score,
        terms_sum=total,
        query_terms=_top_terms(pairs.sum(1), names_q, top) + extra,
        key_terms=_top_terms(pairs.sum(0), names_k, top) + extra,
        pairs=tuple(
            Pair(names_q[i // len(names_k)], names_k[i % len(names_k)], v)
            for i, v in _largest(pairs.flatten(), top)
        ),
    )


def _largest(values: Tensor, top: int | None) -> list[tuple[int, float]]:
    """(index, value) of the ``top`` entries of largest magnitude, largest first."""
    k = values.numel() if top is None else min(top, values.numel())
    order = values.abs().topk(k).indices
    return list(zip(order.tolist(), values[order].tolist(), strict=True))


def _top_terms(values: Tensor, names: list[str], top: int | None) -> tuple[Term, ...]:
    return tuple(Term(names[i], v) for i, v in _largest(values, top))
