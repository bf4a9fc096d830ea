"""The residual-node panel's "SAE latents" tab (issue 14): the node's state as its SAE's parts,
the active latents ``f_i d_i``, ``b_dec`` and the reconstruction error ε (always listed), each
with its contribution and direct effect; a selected latent's top corpus examples and a button
that scales it in the interventions below (route before and after, as for heads); and the heads
panel's split of an attention edge over its source's latents.

The numbers are :func:`llm_flow.analyses.latents.latents`'s (``llm-flow latents``,
``lf.latents``), for the SAE the CLI would pick (:mod:`app.saes`); this module lays them out.
"""

from __future__ import annotations

import streamlit as st

from app import latents_cache, saes, session
from app.cache import CachedTrace
from app.figures import tables
from app.latents_cache import LatentsKey
from app.saes import SaeRef
from app.selection import Selection, selected_row
from app.views.errors import show_error
from app.views.examples import Unit, top_examples_section
from llm_flow.analyses.latents import Latent, Latents
from llm_flow.config import AppConfig
from llm_flow.errors import LlmFlowError
from llm_flow.io.text import display_token, markdown_text
from llm_flow.models.sae import hooks_of_node

_NUMBER = st.column_config.NumberColumn(format="%.3f")


def latents_tab(
    cfg: AppConfig, cached: CachedTrace, selection: Selection, pair: tuple[str, str] | None
) -> None:
    """The tab's content for residual node ``selection`` (``pair``: the sidebar's valid target
    and distractor)."""
    kind, layer, node = selection.node, selection.layer, selection.id
    ref = saes.node_sae(cached.key.model.spec, kind, layer)
    if ref is None:
        train = f", or train one: `llm-flow sae train --layer {layer}`" if kind == "I" else ""
        st.caption(
            f'No SAE is attached to this node. Add `"saes": {{"{hooks_of_node(kind, layer)[0]}'
            f"\": PATH_OR_REPO}}` to the model's config entry (a SAELens folder, a Gemma Scope "
            f"params.npz or a hub repository){train}."
        )
        return
    try:
        result = latents_cache.get_latents(LatentsKey(cached.key, node, ref, pair), cached)
    except LlmFlowError as exc:
        show_error(exc, 'Fix the model\'s "saes" entry in the config file, or train another SAE.')
        return
    st.markdown(
        f"SAE on `{result.hook}`: **{result.l0}** active latents (L0), explained variance "
        f"**{result.explained_variance:.3f}**; the error ε has "
        f"a contribution of {result.error_contribution:.3f}."
    )
    key = f"latents|{node}"
    st.dataframe(
        tables.latents_table(result, pair is not None),
        key=key,
        on_select="rerun",
        selection_mode="single-row",
        hide_index=True,
        width="stretch",
        column_config={name: _NUMBER for name in [*tables.LATENT_COLUMNS[1:], tables.DIFF_COLUMN]},
    )
    predicted = _quoted(result.predicted_token)
    st.caption(
        f"The node's state = Σ active latents fᵢ·dᵢ + b_dec + ε. **contribution**: each part's "
        "proximity to the state, normalized over all parts (they sum to 1). **direct effect**: "
        f"the part through the final norm (scale frozen) onto the logit of {predicted}, the "
        "prediction here"
        + (
            f"; **{tables.DIFF_COLUMN}**: onto {_quoted(pair[0])} − {_quoted(pair[1])}"
            if pair
            else ""
        )
        + f". Source: {markdown_text(ref.source)}. Select a latent's row for its top examples "
        "and to scale it."
    )
    row = selected_row(st.session_state.get(key))
    if row is not None and row < len(result.latents):
        _latent(cfg, cached, ref, result, result.latents[row], node)


def _quoted(token: str) -> str:
    return f"“{markdown_text(display_token(token))}”"


def _latent(
    cfg: AppConfig, cached: CachedTrace, ref: SaeRef, result: Latents, latent: Latent, node: str
) -> None:
    name = f"{result.hook}:{latent.index}"
    st.markdown(f"**Latent {latent.index}** (activation {latent.activation:.3f})")
    top_examples_section(cfg, cached, latent_unit(cached, ref, latent.index), f"{node}|{name}")
    left, right = st.columns([1, 2], vertical_alignment="bottom")
    scale: float = left.number_input(
        "Scale", value=0.0, step=0.5, key=f"latent_scale|{node}|{latent.index}"
    )
    right.button(
        "Scale this latent and re-run" if scale else "Ablate this latent and re-run",
        key=f"ablate_latent|{node}|{latent.index}",
        on_click=session.ablate_latent,
        args=(name, scale),
    )
    st.caption(
        f"Runs the model with `{name}`'s part scaled by the factor at every position (0 removes "
        "it), in “Ablate components” below: the prediction and the route before and after."
    )


def latent_unit(cached: CachedTrace, ref: SaeRef, latent: int) -> Unit:
    """Latent ``latent`` of SAE ``ref``: indexed with every latent of its SAE."""
    llm = cached.trace.llm
    return Unit(
        report=lambda corpus: latents_cache.latent_examples(llm, corpus, ref, latent),
        build=lambda corpus, limit, progress: latents_cache.build_latent_index(
            llm, corpus, ref, limit, progress
        ),
        what=f"the latents of the SAE on {ref.hook}",
        command=f"llm-flow index --sae {ref.hook}",
    )


def source_sae(cached: CachedTrace, layer: int, source: int) -> SaeRef | None:
    """The SAE on the source node of an attention edge into ``layer`` from token ``source``."""
    kind, at = ("X", 0) if layer == 0 else ("I", layer - 1)
    return saes.node_sae(cached.key.model.spec, kind, at)


def source_latents_tab(cached: CachedTrace, ref: SaeRef, edge: str) -> None:
    """The heads panel's "Source latents" tab, offered when the edge's source has an SAE: the
    edge's part z[t,s] split over the source's SAE parts through the frozen-scale norm (Σ latent
    parts + b_dec + biases + ε = z[t,s]), each part's contribution to it, and a way to the source
    node's own latents."""
    try:
        result = latents_cache.get_edge_latents(cached, edge, ref)
    except LlmFlowError as exc:
        show_error(exc, 'Fix the model\'s "saes" entry in the config file, or train another SAE.')
        return
    st.markdown(
        f"Which latents of `{result.hook}` at {result.source} this edge carries "
        f"({result.l0} active there): its part, of L1 norm {result.part_norm:.3g} and weight "
        f"{result.weight:.3f} in the graph (before renormalizing), as the source's SAE parts."
    )
    st.dataframe(
        tables.edge_latents_table(result),
        hide_index=True,
        width="stretch",
        column_config={name: _NUMBER for name in tables.EDGE_LATENT_COLUMNS[1:]},
    )
    st.caption(
        f"The source's state = Σ active latents fᵢ·dᵢ + b_dec + ε; with the pre-attention norm's "
        f"scale at {result.source} frozen, each piece goes through every head's value and output "
        "projections, weighted by its attention to this token, and the map's constant (the norm's "
        "and the value bias) is the biases row: the parts sum to the edge's part exactly. "
        "**contribution**: each part's proximity to the edge's part, normalized (they sum to 1)."
    )
    st.button(
        f"Show {result.source}'s own latents",
        key=f"source_latents|{edge}",
        on_click=session.select,
        args=(result.source,),
    )
