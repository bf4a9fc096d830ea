"""The Python API for notebooks and scripts (a stable contract; docs/architecture.md, "Python
API")::

    import llm_flow as lf
    model = lf.load()                                  # the config's default model
    tr = lf.trace(model, "The capital of France is")   # one forward pass + the full graph
    route = tr.route(threshold=0.04)                   # the route to the last token
    route.figure()                                     # the app's graph (plotly)
    route.to_json()                                    # exactly `llm-flow graph --format json`
    tr.contrast(" Paris", " London")                   # why the target, not the distractor?
    lf.ablate(tr, heads="23.3", target=" Paris", distractor=" London")
    lf.attend(tr, layer=3, head=2, query=-1, source=1)  # why head 3.2 attends there (QK)

:class:`Trace` and :class:`Route` are the engine's objects with the front-end methods added, so
everything in ``llm_flow.engine`` and ``llm_flow.analyses`` accepts them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_flow.analyses import ablation as _ablation
from llm_flow.analyses import contrast as _contrast
from llm_flow.analyses import edge_latents as _edge_latents
from llm_flow.analyses import interventions as _interventions
from llm_flow.analyses import latents as _latents
from llm_flow.analyses import top_examples as _top_examples
from llm_flow.analyses.attend import attend
from llm_flow.analyses.faithfulness import faithfulness
from llm_flow.analyses.lens import TokenScore, logit_lens
from llm_flow.api_models import LOADED_FROM, from_hf, load, load_sae, model_sae, node_sae
from llm_flow.engine import routes as _routes
from llm_flow.engine import trace as _trace
from llm_flow.engine.nodes import source_id
from llm_flow.engine.routes import DEFAULT_THRESHOLD
from llm_flow.errors import InputError
from llm_flow.io import export
from llm_flow.io import index_store as _index_store
from llm_flow.io.figure import flow_figure
from llm_flow.models import TransparentLlm
from llm_flow.models import sae as _sae
from llm_flow.models.sae import Sae

if TYPE_CHECKING:
    import networkx as nx
    import plotly.graph_objects as go

    from llm_flow.analyses.corpus_index import CorpusIndex, IndexProgress
    from llm_flow.analyses.interventions import MeanActivations, Mode

__all__ = [
    "Route",
    "Trace",
    "ablate",
    "ablate_latents",
    "attend",
    "build_index",
    "edge_latents",
    "faithfulness",
    "from_hf",
    "latents",
    "load",
    "load_sae",
    "mean_activations",
    "top_examples",
    "top_latent_examples",
    "trace",
]


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


@dataclass(frozen=True)
class Trace(_trace.Trace):
    """One prompt's forward pass and full contribution graph (:class:`llm_flow.engine.trace.
    Trace`), with the analyses as methods."""

    def route(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        position: int = -1,
        renormalize: bool = True,
    ) -> Route:
        """The route to the output node of ``position``: edges of weight ≥ ``threshold``,
        rescaled to sum to 1 per whole unless ``renormalize`` is False."""
        p = self.position(position)
        found = _routes.find_route(self.graph, [p], threshold, renormalize)
        return Route(**_fields(found), trace=self, position=p)

    def full_graph(self, position: int = -1) -> Route:
        """Every causal edge, unpruned and unnormalized (``llm-flow graph --threshold 0
        --no-renormalize``); ``position`` only picks the prediction reported."""
        found = _routes.full_graph(self.graph)
        return Route(**_fields(found), trace=self, position=self.position(position))

    def contrast(
        self,
        target: str,
        distractor: str,
        position: int = -1,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        renormalize: bool = True,
    ) -> _contrast.ContrastAnalysis:
        """Why ``target`` rather than ``distractor`` after ``position``: the logit difference,
        every component's direct effect and attribution, and the effect table of the route at
        ``threshold`` (``.frame()`` is a pandas table). One extra forward + backward pass."""
        route = self.route(threshold, position, renormalize)
        return _contrast.analyse_contrast(self, route, target, distractor)

    def lens(self, node: str, *, k: int = 10, normalize: bool = True) -> list[TokenScore]:
        """Logit lens at the residual node ``node`` (``X0_t``, ``A{l}_t`` or ``I{l}_t``)."""
        return logit_lens(self, node, normalize=normalize, k=k)


@dataclass(frozen=True)
class Route(_routes.Route):
    """A route of a :class:`Trace` (:class:`llm_flow.engine.routes.Route`) that can draw and
    export itself; ``position`` is the output position whose prediction exports report."""

    trace: Trace
    position: int

    def figure(self, selected: str | None = None) -> go.Figure:
        """The app's layer × token graph of this route; ``selected`` (a node or edge id such as
        ``M3_5`` or ``I2_1->A3_5``) is ringed in red."""
        return flow_figure(self.trace, self, position=self.position, selected=selected)

    def to_json(
        self, *, heads: bool = False, contrast: _contrast.ContrastAnalysis | None = None
    ) -> dict[str, Any]:
        """Exactly ``llm-flow graph --format json``: ``heads`` adds per-head weights to
        attention edges; ``contrast`` (from :meth:`Trace.contrast`) the target/distractor
        fields and each edge's direct effect."""
        pair = None if contrast is None else contrast.contrast
        direct = None if contrast is None else contrast.direct
        return export.graph_json(
            self.trace, self, position=self.position, heads=heads, contrast=pair, direct=direct
        )

    def to_networkx(self, **json_options: Any) -> nx.MultiDiGraph:
        """A ``networkx.MultiDiGraph`` keyed by edge kind (options as :meth:`to_json`)."""
        return export.to_networkx(self.to_json(**json_options))

    def to_graphml(self, **json_options: Any) -> str:
        """GraphML text, as ``llm-flow graph --format graphml``."""
        return export.to_graphml(self.to_json(**json_options))


def trace(
    model: TransparentLlm,
    prompt: str,
    *,
    keep_patterns: bool | None = None,
    attention_floor: float | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> Trace:
    """Run ``prompt`` once and compute every contribution (``on_layer(done, total)`` reports
    progress). Attention patterns are kept while every layer's fit in 2 GiB (``keep_patterns``
    True / False forces it); per-head views, contrast and faithfulness recompute the rows they
    need of a dropped pattern in one forward pass. Attention edges below ``attention_floor`` are
    not stored, so routes are exact for thresholds at or above it (0 keeps every edge, at
    [L, T, T] memory; None: every edge while they fit in 256 MiB, ~1,000 tokens of SmolLM2,
    else 1e-4)."""
    found = _trace.trace(
        model,
        prompt,
        keep_patterns=keep_patterns,
        attention_floor=attention_floor,
        on_layer=on_layer,
    )
    return Trace(**_fields(found))


def mean_activations(
    model: TransparentLlm,
    prompts: Sequence[str],
    *,
    source: str = "",
    on_prompt: Callable[[int, int], None] | None = None,
) -> MeanActivations:
    """Mean head values and neuron activations over every position of ``prompts`` (one forward
    pass each; ``on_prompt(done, total)`` reports them), for ``ablate(..., mode="mean")``;
    ``source`` names them in reports (e.g. the prompt file)."""
    return _interventions.mean_activations(model, list(prompts), source=source, on_prompt=on_prompt)


Units = str | Sequence[tuple[int, int]]


def _units(units: Units) -> str:
    """``"9.3,10.7"`` as given, or ``[(9, 3), (10, 7)]`` written that way."""
    if isinstance(units, str):
        return units
    return ",".join(f"{int(layer)}.{int(unit)}" for layer, unit in units)


def _pair_ids(
    tr: _trace.Trace, target: str | None, distractor: str | None
) -> tuple[int | None, int | None]:
    """Token ids of an ablation's target and distractor (either may be None; a distractor needs
    a target)."""
    if distractor is not None and target is None:
        raise InputError("a distractor needs a target too; give both, or only a target")
    if target is not None and distractor is not None:
        return _contrast.contrast_ids(tr.llm, target, distractor)
    if target is not None:
        return _contrast.single_token(tr.llm, target, "target"), None
    return None, None


def ablate(
    tr: _trace.Trace,
    *,
    heads: Units = "",
    neurons: Units = "",
    edges: str = "",
    experts: Units = "",
    mode: Mode = "zero",
    means: MeanActivations | None = None,
    target: str | None = None,
    distractor: str | None = None,
    position: int = -1,
    k: int = _ablation.TOP_K,
    traced: bool = False,
) -> _ablation.AblationResult:
    """Zero- or mean-ablate heads (``"9.3,10.7"`` or ``[(9, 3), (10, 7)]``), neurons
    (``"5.120"`` or ``[(5, 120)]``), routed experts of mixture-of-experts layers (``"3.1"`` or
    ``[(3, 1)]``) and attention edges (``"3:1>4"``, ``"3.2:1>4"``) and compare the prediction
    after ``position`` before and after (with ``target``, its log-prob; with ``distractor`` too,
    the logit difference).
    ``traced=True`` also traces the ablated run: ``.route_diff(threshold)`` compares routes."""
    ablation = _interventions.Ablation(
        heads=_interventions.parse_heads(_units(heads)),
        neurons=_interventions.parse_neurons(_units(neurons)),
        edges=_interventions.parse_edges(edges),
        mode=mode,
        experts=_interventions.parse_experts(_units(experts)),
    )
    target_id, distractor_id = _pair_ids(tr, target, distractor)
    return _ablation.ablate(
        tr,
        ablation,
        means=means,
        target_id=target_id,
        distractor_id=distractor_id,
        position=position,
        k=k,
        traced=traced,
    )


# -- sparse-autoencoder latents ---------------------------------------------------------------


def latents(
    tr: _trace.Trace,
    node: str,
    sae: Sae | str | Path | None = None,
    *,
    top: int = 20,
    target: str | None = None,
    distractor: str | None = None,
) -> _latents.Latents:
    """The residual ``node`` (``"I5_3"``) as SAE latents, ``b_dec`` and the error: each part's
    contribution (they sum to 1) and direct effect; ``.to_json()`` is ``llm-flow latents``."""
    return _latents.latents(
        tr, node, node_sae(tr, node, sae), top=top, target=target, distractor=distractor
    )


def edge_latents(
    tr: _trace.Trace,
    edge: str,
    sae: Sae | str | Path | None = None,
    *,
    top: int = 20,
) -> _edge_latents.EdgeLatents:
    """The attention ``edge`` (``"I4_2->A5_7"``, ``"X0_2->A0_7"``) split over the SAE latents
    of its source (``b_dec``, a ``bias`` part and the error too): each part's contribution to
    the edge's part (they sum to 1); ``.to_json()`` is ``llm-flow latents --edge``. The SAE is
    found as for :func:`latents` of the source node."""
    layer, _, source = _edge_latents.parse_edge(edge, tr.n_layers, tr.n_tokens)
    node = source_id(layer, source)
    return _edge_latents.edge_latents(tr, edge, node_sae(tr, node, sae), top=top)


def ablate_latents(
    tr: _trace.Trace,
    sae: Sae | str | Path,
    indices: Sequence[int],
    *,
    scale: float = 0.0,
    target: str | None = None,
    distractor: str | None = None,
    position: int = -1,
    k: int = _ablation.TOP_K,
    traced: bool = False,
) -> _ablation.AblationResult:
    """Scale the parts of SAE latents ``indices`` by ``scale`` (0 removes them) at every
    position and compare the prediction (``traced=True``: and the route) before and after."""
    loaded = sae if isinstance(sae, Sae) else _sae.load_sae(sae)
    target_id, distractor_id = _pair_ids(tr, target, distractor)
    return _latents.ablate_latents(
        tr,
        loaded,
        indices,
        scale=scale,
        target_id=target_id,
        distractor_id=distractor_id,
        position=position,
        k=k,
        traced=traced,
    )


def build_index(
    model: TransparentLlm,
    corpus: str | Path | None = None,
    *,
    layers: Sequence[int] | None = None,
    window: int = _index_store.DEFAULT_WINDOW,
    k: int = _index_store.DEFAULT_K,
    max_tokens: int | None = None,
    progress: IndexProgress | None = None,
    saes: Sequence[Sae | str | Path] = (),
    ray: str | bool = False,
    workers: int | None = None,
) -> CorpusIndex:
    """The corpus index of ``model`` (``llm-flow index``): each neuron's, head's and expert's
    top ``k`` examples and histogram over ``corpus`` (a text / JSONL / prompt file, a folder of
    them or a Hugging Face dataset name; None: the shipped public-domain books), cut into
    windows of ``window`` tokens, for ``layers`` (None: all, or none when ``saes`` are given),
    at most ``max_tokens`` tokens; and the latents of each SAE in ``saes`` (SAEs, paths /
    repos, or hook names: the model's SAE there, as :func:`latents` finds it). Read from the
    cache when built before; ``progress(windows, tokens)`` hears each batch.

    ``ray=True`` (a local cluster) or ``ray="HOST:PORT"`` builds the same index as a Ray job
    (``llm-flow index --ray``) on ``workers`` workers that each load ``model`` again as
    :func:`load` loaded it (a model from :func:`from_hf` cannot be sent)."""
    found = [_index_sae(model, sae) for sae in saes]
    if ray:
        from llm_flow.distributed import LOCAL, ModelRecipe, RayOptions, ray_index

        if model not in LOADED_FROM:
            raise InputError(
                "Ray workers load the model themselves from its config entry: load it with "
                "lf.load(...) to build the index on Ray"
            )
        spec, device, dtype = LOADED_FROM[model]
        return ray_index(
            ModelRecipe(spec, device, dtype),
            corpus,
            layers=layers,
            window=window,
            k=k,
            max_tokens=max_tokens,
            options=RayOptions(LOCAL if ray is True else ray, workers),
            progress=progress,
            saes=found,
        )
    return _index_store.build_index(
        model,
        corpus,
        layers=layers,
        window=window,
        k=k,
        max_tokens=max_tokens,
        progress=progress,
        saes=found,
    )


def _index_sae(model: TransparentLlm, sae: Sae | str | Path) -> Sae:
    """An SAE of ``build_index``'s ``saes``: as given, the model's on a hook name (as
    :func:`latents` finds it), or read from a path or repo."""
    if isinstance(sae, str) and _sae.HOOK.match(sae):
        return model_sae(model, _sae.node_of_hook(sae, 0), None)
    return model_sae(model, "X0_0", sae)


def top_examples(
    model: TransparentLlm,
    kind: str,
    layer: int,
    unit: int,
    *,
    k: int = 20,
    corpus: str | Path | None = None,
    index: CorpusIndex | None = None,
) -> _top_examples.UnitReport:
    """The top ``k`` corpus examples of a ``"neuron"``, ``"head"`` or ``"expert"``
    ``layer.unit`` (``llm-flow top``): ``.examples``, ``.histogram``, ``.explanation`` (an
    automatic summary, no language model) and ``.to_dict()`` (the CLI's JSON). From ``index``,
    or the newest saved index of ``corpus`` (None: the shipped one) that covers the layer."""
    kind = _top_examples.check_unit(model, kind, layer, unit)
    if index is None:
        index = _index_store.find_index(model, corpus, kind, layer)
    return _top_examples.unit_report(model, index, kind, layer, unit, k)


def top_latent_examples(
    model: TransparentLlm,
    latent: str,
    *,
    sae: Sae | str | Path | None = None,
    k: int = 20,
    corpus: str | Path | None = None,
    index: CorpusIndex | None = None,
) -> _top_examples.UnitReport:
    """The top ``k`` corpus examples of the SAE latent ``latent``
    (``"blocks.3.hook_resid_post:12"``; ``llm-flow top --latent``): a :class:`UnitReport` as
    :func:`top_examples` gives. The SAE is
    ``sae`` (or a path), else the model's on that hook as :func:`latents` finds it; the index
    is ``index``, or the newest saved index of ``corpus`` (None: the shipped one) built with
    that SAE's weights (``build_index(..., saes=[…])``)."""
    hook, unit = _top_examples.parse_latent(latent)
    found = model_sae(model, _sae.node_of_hook(hook, 0), sae, hook)
    if index is None:
        index, slot = _index_store.find_latent_index(model, corpus, found)
    else:
        slot = _index_store.latent_slot(index, found)
    return _top_examples.latent_report(model, index, slot, unit, k)
