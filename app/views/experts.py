"""The FFN panel of a mixture-of-experts block: its experts at the clicked token, then the
chosen expert's neurons and the tokens it (or one of its neurons) promotes and suppresses.

Expert parts are normalized with the residual, like a dense FFN's neurons
(:func:`llm_flow.engine.graph.layer_expert_contributions`); inside an expert a neuron's part is
router weight × activation × its output row, the sign kept.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st
import torch

from app import session
from app.figures import panels as panel_figures
from app.selection import Selection
from llm_flow.analyses.lens import block_update, expert_neuron_update, expert_update
from llm_flow.engine.contributions import neuron_contributions
from llm_flow.engine.graph import layer_expert_contributions
from llm_flow.engine.nodes import node_id
from llm_flow.models.base import LayerRun, ModelRun

TOP_NEURONS = 20
WHOLE = "whole FFN block"
SHARED = "shared"
# Shows promoted / suppressed tokens of an update at a position (the panel's token tables).
TokenTables = Callable[[torch.Tensor, int], None]


def _label(expert: int | None) -> str:
    return SHARED if expert is None else f"e{expert}"


def experts_panel(
    selection: Selection,
    run: ModelRun,
    token: str,
    token_tables: TokenTables,
    top_examples: Callable[[int], None],
) -> None:
    """Everything below the FFN share line for an MoE block (``token``: the token, written);
    ``top_examples(e)`` draws routed expert e's top examples from a corpus."""
    layer, t = selection.layer, selection.token
    layer_run = run.layers[layer]
    ex = layer_run.experts
    assert ex is not None  # the caller routes only MoE blocks here
    shares, residual = layer_expert_contributions(layer_run, torch.tensor([t]))
    routed = ex.index[t].tolist()
    experts: list[int | None] = sorted(routed, key=lambda e: -float(shares[0, e]))
    if ex.shared_acts is not None:
        experts.append(None)
    weight_of = {int(e): float(w) for e, w in zip(routed, ex.weight[t].tolist(), strict=True)}
    labels = [_label(e) for e in experts]
    values = [float(shares[0, -1 if e is None else e]) for e in experts]
    weights = [weight_of[e] if e is not None else 1.0 for e in experts]
    preferred = session.preferred_unit(selection.id)  # an expert chosen in the effect table
    default = labels.index(_label(preferred)) + 1 if preferred in routed else 1
    choice = st.selectbox(
        "Expert",
        [WHOLE, *labels],
        index=default,
        key=f"expert|{selection.id}",
        format_func=lambda c: c if c == WHOLE else _describe(c, weight_of),
    )
    expert = None if choice in (WHOLE, SHARED) else int(choice[1:])
    st.plotly_chart(
        panel_figures.experts_figure(labels, values, weights, None if choice == WHOLE else choice),
        key=f"expert_bars|{selection.id}",
        config=panel_figures.PLOTLY_CONFIG,
    )
    st.caption(
        f"The {len(routed)} experts routed to at this token (of {ex.n_experts})"
        + (" and the shared expert" if ex.shared_acts is not None else "")
        + f", by contribution to {node_id('I', layer, t)}: each part is router weight × the "
        f"expert's output, normalized together with the FFN bias and the residual "
        f"({float(residual[0]):.3f}). Hover: the router weight (1 for the shared expert, "
        "whose own gate is inside its part)."
    )
    if choice == WHOLE:
        st.markdown(f"**Tokens the whole FFN block promotes and suppresses** at {token}")
        token_tables(block_update(run, layer, "ffn", t), t)
        return
    if expert is None:  # the shared expert: no router weight to rank a corpus by
        _expert_neurons(selection, layer_run, run, expert, token, token_tables)
        return
    neurons_tab, examples = st.tabs(["Neurons", "Top examples"])
    with neurons_tab:
        _expert_neurons(selection, layer_run, run, expert, token, token_tables)
    with examples:
        top_examples(expert)


def _describe(label: str, weight_of: dict[int, float]) -> str:
    if label == SHARED:
        return "shared expert (always on)"
    return f"expert {label[1:]} (router weight {weight_of[int(label[1:])]:.3f})"


def _expert_neurons(
    selection: Selection,
    layer_run: LayerRun,
    run: ModelRun,
    expert: int | None,
    token: str,
    token_tables: TokenTables,
) -> None:
    layer, t = selection.layer, selection.token
    ex = layer_run.experts
    assert ex is not None
    parts = ex.neurons(t, expert)
    assert parts is not None  # only routed experts (and an existing shared one) are offered
    acts, W_out, b_out = parts
    scale = layer_run.mlp_scale[t]
    whole = layer_run.resid_post[t]
    own = (acts.float() @ W_out.float() + b_out.float()) * scale.float()
    neurons, bias, rest = neuron_contributions(
        whole, whole.float() - own, acts, W_out, b_out, scale
    )
    k = min(TOP_NEURONS, neurons.numel())
    top = neurons.topk(k)
    ids, values = top.indices.tolist(), top.values.tolist()
    neuron_acts = acts[top.indices].float().tolist()
    name = "the shared expert" if expert is None else f"expert {expert}"
    choice = st.selectbox(
        "Neuron",
        [-1, *ids],
        index=0,
        key=f"expert_neuron|{selection.id}|{expert}",
        format_func=lambda n: f"all of {name}" if n == -1 else f"neuron {n}",
    )
    st.plotly_chart(
        panel_figures.neurons_figure(ids, values, neuron_acts, None if choice == -1 else choice),
        key=f"expert_neuron_bars|{selection.id}|{expert}",
        config=panel_figures.PLOTLY_CONFIG,
    )
    st.caption(
        f"Top {k} neurons of {name} by contribution to {node_id('I', layer, t)}: router weight × "
        f"activation × output row, normalized with its bias ({float(bias):.3f}) and everything "
        f"else in the residual — the residual and the other experts ({float(rest):.3f}). "
        "Colour: the sign of router weight × activation."
    )
    if choice == -1:
        st.markdown(f"**Tokens {name} promotes and suppresses** at {token}")
        token_tables(expert_update(run, layer, expert, t), t)
    else:
        st.markdown(f"**Tokens neuron {choice} of {name} promotes and suppresses** at {token}")
        token_tables(expert_neuron_update(run, layer, expert, int(choice), t), t)
