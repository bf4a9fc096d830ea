"""A unit's top examples from a corpus index, and an automatic summary of them.

:func:`top_examples` turns an index's raw samples (window, position, value) into the examples
``llm-flow top`` prints: the window's token ids (exactly the context the model read, so a fresh
pass over ``token_ids[:position + 1]`` gives the same value), the activating token and the
window's text. :func:`explain` summarizes them without a language model, after TDB's neuron
viewer: the tokens the unit fires on most often, the tokens that usually come just before, and
for a neuron or expert the tokens its output promotes and suppresses through the unembedding at
its best example (:func:`llm_flow.analyses.lens.run_promoted_suppressed`). An SAE latent
``HOOK:I`` is a unit too (:func:`latent_report`), found in the index by its SAE.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from llm_flow.analyses.corpus_index import EDGES, KINDS, RANKED, CorpusIndex, Kind, TopK
from llm_flow.analyses.lens import expert_update, neuron_update, run_promoted_suppressed
from llm_flow.errors import CorpusError, IndexNotFoundError
from llm_flow.models.base import TransparentLlm
from llm_flow.models.sae import parse_hook
from llm_flow.validate import check_at_least

LABEL = "automatic summary (no language model)"
SUMMARY_TOKENS = 5  # tokens named in each list of a summary
CONTEXT_TOKENS = 8  # tokens of context shown before an activating token


@dataclass(frozen=True)
class Example:
    """One top example: the window's token ids, the activating position in it, the token there,
    the window's text and the unit's value (for heads also its attention away from the first
    token)."""

    token_ids: tuple[int, ...]
    position: int
    token: str
    text: str
    activation: float
    attention_away: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self) | {"token_ids": list(self.token_ids)}
        if self.attention_away is None:
            del data["attention_away"]
        return data


def parse_unit(text: str, kind: str) -> tuple[int, int]:
    """``"5.120"`` → (layer 5, unit 120); :class:`CorpusError` showing the form."""
    layer, dot, unit = text.strip().partition(".")
    if not (dot and layer.isdigit() and unit.isdigit()):
        raise CorpusError(f"cannot read {kind} {text!r}; write it as LAYER.INDEX, e.g. 5.120")
    return int(layer), int(unit)


def check_unit(llm: TransparentLlm, kind: str, layer: int, unit: int) -> Kind:
    """``kind`` as a :data:`Kind` once ``layer`` and ``unit`` exist in the model;
    :class:`CorpusError` listing the valid ones."""
    info = llm.info
    if kind == "latent":
        raise CorpusError(
            "an SAE latent is named by its SAE's hook and its index (HOOK:INDEX), not by a layer "
            "and a unit; the kinds named that way are neuron, head, expert"
        )
    if kind not in KINDS:
        raise CorpusError(f"unknown unit kind {kind!r}; valid kinds are {', '.join(KINDS)}")
    if not 0 <= layer < info.n_layers:
        raise CorpusError(f"layer {layer} does not exist; valid layers are 0..{info.n_layers - 1}")
    moe = set(info.moe_layers)
    if kind == "expert" and layer not in moe:
        where = f"its MoE layers are {', '.join(map(str, sorted(moe)))}" if moe else "it has none"
        raise CorpusError(f"layer {layer} of {info.name} is not a mixture of experts ({where})")
    if kind == "neuron" and layer in moe:
        raise CorpusError(
            f"layer {layer} of {info.name} is a mixture of experts: it has experts, not neurons"
        )
    size = {"neuron": info.d_mlp, "head": info.n_heads, "expert": info.n_experts}[kind]
    if not 0 <= unit < size:
        raise CorpusError(f"{kind} {unit} does not exist in layer {layer}; valid: 0..{size - 1}")
    return kind


def top_examples(
    llm: TransparentLlm, index: CorpusIndex, kind: str, layer: int, unit: int, k: int = 20
) -> list[Example]:
    """The ``k`` best examples of unit ``layer.unit`` of ``kind`` in ``index``, largest value
    first (at most the index's k)."""
    checked = check_unit(llm, kind, layer, unit)
    check_at_least("k", k, 1)
    top = index.top.get((checked, layer))
    if top is None:
        raise IndexNotFoundError(f"this corpus index does not cover {kind}s of layer {layer}")
    return _examples(llm, index, top, unit, k)


def _examples(
    llm: TransparentLlm, index: CorpusIndex, top: TopK, unit: int, k: int
) -> list[Example]:
    """The ``k`` best examples of row ``unit`` of ``top``."""
    examples = []
    for rank in range(min(k, top.k)):
        window = int(top.windows[unit, rank])
        if window < 0:
            break
        ids = index.windows[window]
        position = int(top.positions[unit, rank])
        away = float(top.extra[unit, rank])
        examples.append(
            Example(
                token_ids=ids,
                position=position,
                token=llm.token_strings([ids[position]])[0],
                text=llm.decode(ids),
                activation=float(top.values[unit, rank]),
                attention_away=None if np.isnan(away) else away,
            )
        )
    return examples


def histogram_dict(index: CorpusIndex, kind: Kind, layer: int, unit: int) -> dict[str, Any]:
    """The unit's histogram of its ranked measure, as ``top`` prints it: ``counts[i]`` counts
    ``edges[i-1] ≤ x < edges[i]`` (the first and last counts: below / at or above the ends);
    a head's ``attention_away`` histogram rides along under ``"attention_away"``."""

    def one(name: str) -> dict[str, Any]:
        counts = index.histograms[kind, layer, name][unit]
        # float32 edges at their shortest decimal (0.02, not 0.019999999552965164)
        edges = [float(str(edge)) for edge in EDGES[name]]
        return {"measure": name, "edges": edges, "counts": counts.tolist()}

    data = one(RANKED[kind])
    if kind == "head":
        data["attention_away"] = one("attention_away")
    return data


def explain(
    llm: TransparentLlm,
    kind: str,
    layer: int,
    unit: int,
    examples: list[Example],
    *,
    name: str | None = None,
) -> dict[str, Any]:
    """An automatic summary of a unit from its top examples: ``label``, ``text`` (one
    paragraph, naming the unit ``name``, by default ``kind layer.unit``), ``top_tokens`` and
    ``preceding_tokens`` ([token, count], most frequent first), ``contexts`` (the best examples'
    last tokens, the activating one in brackets) and, for a neuron or expert, ``promoted`` /
    ``suppressed`` (tokens its output raises / lowers most at its best example). ``kind``
    ``"latent"``: ``layer`` is not checked."""
    checked = kind if kind == "latent" else check_unit(llm, kind, layer, unit)
    tokens = Counter(e.token for e in examples)
    before = Counter(
        llm.token_strings([e.token_ids[e.position - 1]])[0] for e in examples if e.position > 0
    )
    contexts = [_context(llm, e) for e in examples[:3]]
    data: dict[str, Any] = {
        "label": LABEL,
        "top_tokens": [list(item) for item in tokens.most_common(SUMMARY_TOKENS)],
        "preceding_tokens": [list(item) for item in before.most_common(SUMMARY_TOKENS)],
        "contexts": contexts,
    }
    if examples and checked in ("neuron", "expert"):
        best = examples[0]
        prefix = list(best.token_ids[: best.position + 1])
        run = llm.run(prefix, keep_patterns=False)
        if checked == "neuron":
            update = neuron_update(run, layer, unit, best.position)
        else:
            update = expert_update(run, layer, unit, best.position)
        up, down = run_promoted_suppressed(llm, run, update, best.position, k=SUMMARY_TOKENS)
        data["promoted"] = [s.token for s in up]
        data["suppressed"] = [s.token for s in down]
    data["text"] = _sentence(name or f"{kind} {layer}.{unit}", len(examples), data)
    return data


def _context(llm: TransparentLlm, example: Example) -> str:
    lo = max(0, example.position - CONTEXT_TOKENS)
    before = llm.decode(example.token_ids[lo : example.position])
    return f"{before}[{example.token}]"


def _listed(pairs: list[list[Any]]) -> str:
    return ", ".join(f"{token!r} ({count})" for token, count in pairs)


def _sentence(unit: str, n: int, data: dict[str, Any]) -> str:
    if not n:
        return f"{LABEL}: {unit} has no examples in this corpus."
    parts = [f"{LABEL}: {unit} is most active on {_listed(data['top_tokens'])} of {n} examples"]
    if data["preceding_tokens"]:
        parts.append(f"usually after {_listed(data['preceding_tokens'])}")
    if "promoted" in data:
        promoted = ", ".join(map(repr, data["promoted"]))
        suppressed = ", ".join(map(repr, data["suppressed"]))
        parts.append(f"its output promotes {promoted} and suppresses {suppressed}")
    return "; ".join(parts) + "."


@dataclass(frozen=True)
class UnitReport:
    """A unit's top examples, histogram and automatic explanation: what ``llm-flow top``
    prints (:meth:`to_dict`). A latent's ``hook`` is its SAE's (``layer`` that hook's layer)."""

    kind: Kind
    layer: int
    unit: int
    examples: tuple[Example, ...]
    histogram: dict[str, Any]
    explanation: dict[str, Any]
    hook: str | None = None

    @property
    def name(self) -> str:
        """As ``top`` names it: ``neuron 5.120``, ``head 3.1``, ``latent HOOK:9`` …"""
        where = f"{self.hook}:" if self.hook is not None else f"{self.layer}."
        return f"{self.kind} {where}{self.unit}"

    def to_dict(self) -> dict[str, Any]:
        hook = {} if self.hook is None else {"hook": self.hook}
        return {
            "unit": self.name,
            "kind": self.kind,
            "layer": self.layer,
            **hook,
            "index": self.unit,
            "measure": RANKED[self.kind],
            "examples": [e.to_dict() for e in self.examples],
            "histogram": self.histogram,
            "explanation": self.explanation,
        }


def unit_report(
    llm: TransparentLlm, index: CorpusIndex, kind: str, layer: int, unit: int, k: int = 20
) -> UnitReport:
    """The :class:`UnitReport` of unit ``layer.unit`` of ``kind`` from ``index``."""
    checked = check_unit(llm, kind, layer, unit)
    examples = top_examples(llm, index, checked, layer, unit, k)
    return UnitReport(
        kind=checked,
        layer=layer,
        unit=unit,
        examples=tuple(examples),
        histogram=histogram_dict(index, checked, layer, unit),
        explanation=explain(llm, checked, layer, unit, examples),
    )


def parse_latent(text: str) -> tuple[str, int]:
    """``"blocks.3.hook_resid_post:12"`` → (hook, latent 12); :class:`CorpusError` showing the
    form."""
    hook, sep, unit = text.strip().rpartition(":")
    if not (sep and unit.isdigit()):
        raise CorpusError(
            f"cannot read latent {text!r}; write it as HOOK:INDEX, e.g. blocks.3.hook_resid_post:12"
        )
    parse_hook(hook)
    return hook, int(unit)


def latent_report(
    llm: TransparentLlm, index: CorpusIndex, slot: int, unit: int, k: int = 20
) -> UnitReport:
    """The :class:`UnitReport` of latent ``unit`` of the SAE in place ``slot`` of the index's
    settings (:func:`llm_flow.io.index_store.find_latent_index` finds both)."""
    check_at_least("k", k, 1)
    hook = index.settings.saes[slot][0]
    top = index.top["latent", slot]
    size = top.values.shape[0]
    if not 0 <= unit < size:
        raise CorpusError(
            f"latent {unit} does not exist in the SAE on {hook}; valid: 0..{size - 1}"
        )
    examples = _examples(llm, index, top, unit, k)
    name = f"latent {hook}:{unit}"
    return UnitReport(
        kind="latent",
        layer=parse_hook(hook)[0],
        unit=unit,
        examples=tuple(examples),
        histogram=histogram_dict(index, "latent", slot, unit),
        explanation=explain(llm, "latent", slot, unit, examples, name=name),
        hook=hook,
    )
