"""The panel beside the graph: what the clicked edge, FFN block or residual node does.

- attention edge → heads panel: each head's share of the edge, the chosen head's attention and
  contribution maps, and the tokens it promotes or suppresses at the target position (a
  "Source latents" tab when the source node has an SAE);
- FFN block → neuron panel: the top neurons by contribution (activation sign shown), and the
  chosen neuron's (or the whole block's) promoted and suppressed tokens; for a mixture of
  experts, the experts panel (``app/views/experts.py``);
- residual node → logit lens with rank changes, and what the block just below it wrote; its SAE
  latents when the model has an SAE there (``app/views/latents.py``).

The math is llm-flow's (``engine.graph``, ``engine.contributions``, ``analyses.lens``); this
module only lays it out.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
import torch

from app import cache, session
from app.cache import CachedTrace
from app.figures import panels as panel_figures
from app.figures import tables
from app.selection import Selection
from app.views.examples import layer_unit, top_examples_section
from app.views.experts import experts_panel
from app.views.latents import latents_tab, source_latents_tab, source_sae
from app.views.why import why_tab
from llm_flow.analyses.lens import (
    block_update,
    head_update,
    logit_lens,
    neuron_update,
    previous_node,
    promoted_suppressed,
    update_between,
)
from llm_flow.config import AppConfig
from llm_flow.engine.contributions import neuron_contributions
from llm_flow.engine.graph import layer_head_contributions
from llm_flow.engine.nodes import NODE_WORDS, describe_node, node_id, source_id
from llm_flow.engine.routes import Route
from llm_flow.io.plot import ATTENTION_RGB, FFN_RGB
from llm_flow.io.text import display_token, markdown_text, position_text, weight_text

TOP_TOKENS = 10
TOP_NEURONS = 20
# Above this many tokens a head's contribution map (all queries of a layer) is computed only
# when asked for: it costs a per-head pass over T² (source, query) pairs.
HEAD_MAP_AUTO_TOKENS = 256
ALL = -1  # the "all heads" / "whole block" choice
SINK_SHOWN = 1e-3  # attention-sink shares below this are rounding, not a sink


@dataclass(frozen=True)
class PanelContext:
    cfg: AppConfig
    cached: CachedTrace
    route: Route
    normalize_lens: bool
    pair: tuple[str, str] | None = None  # the sidebar's target and distractor, when valid


def selection_panel(selection: Selection | None, ctx: PanelContext) -> None:
    if selection is None:
        st.info(
            "**Click the graph** to inspect it: an attention edge (blue) shows its heads, an "
            "FFN square (orange) its neurons, a node (grey) its logit lens. Click a ▼ on top "
            "to explain another position's prediction."
        )
        return
    if selection.kind == "attention":
        heads_panel(selection, ctx)
    elif selection.kind == "ffn":
        ffn_panel(selection, ctx)
    else:
        residual_panel(selection, ctx)
    st.button("Clear selection", key="clear_selection", on_click=session.select, args=(None,))


def _token(tokens: tuple[str, ...], t: int) -> str:
    return f"“{markdown_text(display_token(tokens[t]))}” ({position_text(t)})"


def drawn_attention_text(
    route: Route, graph_weight: float | torch.Tensor, layer: int, t: int, s: int
) -> str:
    """The attention edge's weight exactly as the graph draws (and hovers) it: the route's,
    renormalized or not, else the graph's with a note that it is off the route."""
    idx = torch.tensor([[layer, t, s]])
    if not bool(route.contains(idx)[0]):
        return f"Edge weight **{float(graph_weight):.3f}** (token level; not on the current route)."
    weight = float(route.attention_weights_at(idx)[0])
    renormalized = route.renormalize and float(route.attn_factor[layer, t]) != 1.0
    return f"Edge weight **{weight_text(weight, renormalized)}** (token level, as drawn)."


def drawn_ffn_text(
    route: Route, ffn: float | torch.Tensor, residual: float | torch.Tensor, layer: int, t: int
) -> str:
    """The FFN block's and the residual's share of ``I{layer}_t`` exactly as the graph draws
    them (the route's weights, renormalized or not), else the graph's, said to be off route."""
    whole = node_id("I", layer, t)
    if not (bool(route.ffn[layer, t]) or bool(route.ffn_residual[layer, t])):
        return (
            f"Share of {whole}: FFN **{float(ffn):.3f}**, residual {float(residual):.3f} "
            "(not on the current route)."
        )
    renormalized = route.renormalize and float(route.ffn_factor[layer, t]) != 1.0
    ffn_w, res_w = float(route.ffn_weights[layer, t]), float(route.ffn_residual_weights[layer, t])
    return (
        f"Share of {whole}, as drawn: FFN **{weight_text(ffn_w, renormalized)}**, "
        f"residual {weight_text(res_w, renormalized)}."
    )


def _token_tables(ctx: PanelContext, update: torch.Tensor, position: int) -> None:
    """Promoted and suppressed tokens of an update, side by side."""
    promoted, suppressed = promoted_suppressed(ctx.cached.trace, update, position, k=TOP_TOKENS)
    left, right = st.columns(2)
    left.markdown("**Promoted**")
    left.dataframe(tables.token_table(promoted), hide_index=True, width="stretch")
    right.markdown("**Suppressed**")
    right.dataframe(tables.token_table(suppressed), hide_index=True, width="stretch")


# -- attention edge ---------------------------------------------------------------------------


def heads_panel(selection: Selection, ctx: PanelContext) -> None:
    run, graph = ctx.cached.trace.run, ctx.cached.trace.graph
    layer, t = selection.layer, selection.token
    s = selection.source if selection.source is not None else t
    tokens = run.tokens
    st.subheader(f"Attention {source_id(layer, s)} → {node_id('A', layer, t)}")
    st.markdown(
        f"Layer {layer}: {_token(tokens, s)} → {_token(tokens, t)}. "
        + drawn_attention_text(ctx.route, graph.attention_at(layer, t, s), layer, t, s)
    )

    layer_run = cache.layer_run(ctx.cached, layer)  # with its pattern, recomputed if dropped
    rows = torch.tensor([t], device=run.logits.device)
    heads, _ = layer_head_contributions(layer_run, rows)  # [1, S, H]
    per_head = heads[0, s].cpu()  # [H]
    by_size = per_head.argsort(descending=True).tolist()
    preferred = session.preferred_unit(selection.id)  # a head chosen in the effect table
    choice = st.selectbox(
        "Head",
        [ALL, *by_size],
        # the table's head, else the head that contributes most
        index=1 + by_size.index(preferred) if preferred in by_size else 1,
        key=f"head|{selection.id}",
        format_func=lambda h: "all heads" if h == ALL else f"head {h} ({per_head[h]:.3f})",
    )
    head = None if choice == ALL else int(choice)
    st.plotly_chart(
        panel_figures.heads_figure(per_head.tolist(), head),
        key=f"heads_bars|{selection.id}",
        config=panel_figures.PLOTLY_CONFIG,
    )
    st.caption(
        f"Per-head contributions to {node_id('A', layer, t)}, normalized LLM-TT's way over "
        f"every (source, head) part and the residual; they sum to {float(per_head.sum()):.3f}. "
        "That sum is not the token-level edge weight "
        f"({float(graph.attention_at(layer, t, s)):.3f} before any renormalizing): L1 "
        "proximity is not additive over heads."
    )

    n_tokens = run.n_tokens
    pattern = layer_run.pattern
    sae = source_sae(ctx.cached, layer, s)
    attention_tab, contribution_tab, why, examples, *source_latents = st.tabs(
        ["Attention map", "Contribution map", "Why this source?", "Top examples"]
        + (["Source latents"] if sae is not None else [])
    )
    with attention_tab:
        if pattern is None:
            st.caption("This run kept no attention patterns.")
        else:
            attention = pattern.mean(0) if head is None else pattern[head]
            sinks = layer_run.sink_share()
            assert sinks is not None  # the pattern is there
            sink = float(sinks[:, t].mean() if head is None else sinks[head, t])
            st.caption(
                ("Mean attention over heads" if head is None else f"Attention of head {head}")
                + " (query rows, source columns); the edge's cell is outlined."
                + (
                    f" At {_token(tokens, t)} a share of {sink:.3f} goes to the attention "
                    "sink (no token: it writes nothing), so the row sums to less than 1."
                    if sink > SINK_SHOWN
                    else ""
                )
            )
            st.plotly_chart(
                panel_figures.heatmap_figure(
                    attention,
                    tokens,
                    rgb=ATTENTION_RGB,
                    value_name="attention",
                    mark=(t, s),
                ),
                key=f"attention_map|{selection.id}|{choice}",
                config=panel_figures.PLOTLY_CONFIG,
            )
    with contribution_tab:
        contribution: torch.Tensor | None
        if head is None:
            st.caption(
                f"Token-level contributions of layer {layer}'s attention edges (the graph's). "
                f"Edges below {graph.attention_floor:g} are not stored (0 here); at "
                f"{_token(tokens, t)} they carry {float(graph.attn_dropped[layer, t]):.2g}."
            )
            contribution = graph.attention_rows(layer)
        else:
            st.caption(
                f"Head {head}'s contribution to each query's residual after attention "
                "(LLM-TT's per-head normalization)."
            )
            wanted = n_tokens <= HEAD_MAP_AUTO_TOKENS or st.toggle(
                f"Compute it ({n_tokens} tokens: slow)", key=f"head_map|{selection.id}"
            )
            contribution = cache.head_map(ctx.cached, layer)[:, :, head] if wanted else None
        if contribution is not None:
            st.plotly_chart(
                panel_figures.heatmap_figure(
                    contribution,
                    tokens,
                    rgb=FFN_RGB,
                    value_name="contribution",
                    mark=(t, s),
                ),
                key=f"contribution_map|{selection.id}|{choice}",
                config=panel_figures.PLOTLY_CONFIG,
            )

    with why:
        why_tab(ctx.cached, layer, head, t, s, f"{selection.id}|{choice}")
    with examples:
        if head is None:
            st.info("Choose a head above to see where in a corpus it writes the most.")
        else:
            unit = layer_unit(ctx.cached, "head", layer, head)
            top_examples_section(ctx.cfg, ctx.cached, unit, f"{selection.id}|{head}")
    if sae is not None:
        with source_latents[0]:
            source_latents_tab(ctx.cached, sae, selection.id)

    who = "all heads" if head is None else f"head {head}"
    st.markdown(f"**Tokens {who} of layer {layer} promote and suppress** at {_token(tokens, t)}")
    if head is None:
        update = block_update(run, layer, "attention", t)
    else:
        update = head_update(run, layer, head, t)
    _token_tables(ctx, update, t)


# -- FFN block --------------------------------------------------------------------------------


def ffn_panel(selection: Selection, ctx: PanelContext) -> None:
    run, graph = ctx.cached.trace.run, ctx.cached.trace.graph
    layer, t = selection.layer, selection.token
    tokens = run.tokens
    layer_run = run.layers[layer]
    st.subheader(f"{NODE_WORDS['M']} {selection.id}")
    st.markdown(
        f"Layer {layer} at {_token(tokens, t)}. "
        + drawn_ffn_text(ctx.route, graph.ffn[layer, t], graph.ffn_residual[layer, t], layer, t)
    )
    if layer_run.experts is not None:
        experts_panel(
            selection,
            run,
            _token(tokens, t),
            lambda update, at: _token_tables(ctx, update, at),
            lambda expert: top_examples_section(
                ctx.cfg,
                ctx.cached,
                layer_unit(ctx.cached, "expert", layer, expert),
                f"{selection.id}|e{expert}",
            ),
        )
        return
    neurons, bias, residual = neuron_contributions(
        layer_run.resid_post[t],
        layer_run.mlp_base[t],
        layer_run.neuron_acts[t],
        layer_run.W_out,
        layer_run.b_out,
        layer_run.mlp_scale[t],
    )
    k = min(TOP_NEURONS, neurons.numel())
    top = neurons.topk(k)
    ids = top.indices.tolist()
    values = top.values.tolist()
    acts = layer_run.neuron_acts[t, top.indices].float().tolist()
    act_of = dict(zip(ids, acts, strict=True))
    preferred = session.preferred_unit(selection.id)  # a neuron chosen in the effect table
    choice = st.selectbox(
        "Neuron",
        [ALL, *ids],
        # the table's neuron if it is among the top ones, else the one that contributes most
        index=1 + ids.index(preferred) if preferred in ids else 1,
        key=f"neuron|{selection.id}",
        format_func=lambda n: (
            "whole FFN block" if n == ALL else f"neuron {n} (act {act_of[n]:+.3f})"
        ),
    )
    neuron = None if choice == ALL else int(choice)
    st.plotly_chart(
        panel_figures.neurons_figure(ids, values, acts, neuron),
        key=f"neuron_bars|{selection.id}",
        config=panel_figures.PLOTLY_CONFIG,
    )
    st.caption(
        f"Top {k} neurons by contribution to {node_id('I', layer, t)}: each neuron's part "
        "activation × its output row, normalized together with the FFN bias "
        f"({float(bias):.3f}) and the residual ({float(residual):.3f}; not the graph's residual "
        "edge above, whose whole is the FFN block's output, not its neurons). "
        "Colour: the activation's sign."
    )
    if neuron is None:
        st.markdown(
            f"**Tokens the whole FFN block promotes and suppresses** at {_token(tokens, t)}"
        )
        update = block_update(run, layer, "ffn", t)
    else:
        act = act_of[neuron]
        st.markdown(f"**Tokens neuron {neuron} promotes and suppresses** at {_token(tokens, t)}")
        if act < 0:
            st.caption(
                f"Its activation is negative ({act:+.3f}): the neuron writes the *opposite* of "
                "its output row, so the tables below (which include the sign) are its output "
                "row's promoted and suppressed tokens swapped."
            )
        update = neuron_update(run, layer, neuron, t)
    if neuron is None:
        _token_tables(ctx, update, t)
        return
    tables_tab, examples = st.tabs(["Promoted and suppressed", "Top examples"])
    with tables_tab:
        _token_tables(ctx, update, t)
    with examples:
        unit = layer_unit(ctx.cached, "neuron", layer, neuron)
        top_examples_section(ctx.cfg, ctx.cached, unit, f"{selection.id}|{neuron}")


# -- residual node ----------------------------------------------------------------------------


def residual_panel(selection: Selection, ctx: PanelContext) -> None:
    layer, t = selection.layer, selection.token
    st.subheader(f"Residual {selection.id}")
    st.markdown(
        f"{describe_node(selection.node, layer).capitalize()} at "
        f"{_token(ctx.cached.trace.tokens, t)}."
    )
    lens_tab, latents = st.tabs(["Logit lens", "SAE latents"])
    with lens_tab:
        _lens_tab(selection, ctx)
    with latents:
        latents_tab(ctx.cfg, ctx.cached, selection, ctx.pair)


def _lens_tab(selection: Selection, ctx: PanelContext) -> None:
    traced = ctx.cached.trace
    run = traced.run
    node = selection.id
    layer, t = selection.layer, selection.token
    lens = logit_lens(traced, node, normalize=ctx.normalize_lens, k=TOP_TOKENS)
    previous = previous_node(node, run.n_layers)
    st.markdown("**Logit lens** · top tokens")
    st.dataframe(tables.token_table(lens, lens=True), hide_index=True, width="stretch")
    norm = "through the final norm" if ctx.normalize_lens else "without the final norm"
    rank_note = "" if previous is None else f"; rank: change since {previous} (↑ moved up)"
    st.caption(f"Decoded {norm}{rank_note}.")
    if previous is None:
        return
    update = update_between(run, node)
    if update is None:
        return
    block = "attention" if selection.node == "A" else "FFN"
    st.markdown(f"**What the {block} of layer {layer} wrote here** (between {previous} and {node})")
    _token_tables(ctx, update, t)
    st.button(
        f"Go to {previous}",
        key="go_previous",
        on_click=session.select,
        args=(previous,),
    )
