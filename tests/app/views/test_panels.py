"""Tests for app/views/panels.py: the panel of a selected attention edge, FFN block or residual
node (selections are set in session state; the click itself is test_browser.py's)."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from app import session
from app.views.panels import ALL
from tests.app.apptest import assert_serving, graph_ids, start, subheaders

pytestmark = pytest.mark.usefixtures("offline")


def markdown(at: AppTest) -> str:
    return " | ".join(m.value for m in at.markdown)


def test_selecting_an_edge_a_block_and_a_node_fills_the_panel() -> None:
    at = start({"threshold": "0"})  # the whole graph: every kind of element is on it
    assert_serving(at)
    assert any("Click the graph" in i.value for i in at.info)
    ids = graph_ids(at)
    edge = next(i for i in ids if "->" in i)
    block = next(i for i in ids if i.startswith("M"))
    node = next(i for i in ids if i.startswith("I"))

    at.session_state[session.SELECTION] = edge
    at.run()
    assert_serving(at)
    assert subheaders(at)[-1].startswith("Attention ")
    head = at.selectbox(key=f"head|{edge}")
    assert head.value != ALL  # the strongest head is preselected
    assert any("is not the token-level edge weight" in c.value for c in at.caption)
    assert len(at.dataframe) >= 2  # promoted and suppressed
    assert at.query_params["selection"] == edge
    head.set_value(ALL).run()
    assert_serving(at)

    at.session_state[session.SELECTION] = block
    at.run()
    assert_serving(at)
    assert subheaders(at)[-1] == f"FFN block {block}"
    neuron = at.selectbox(key=f"neuron|{block}")
    assert neuron.value != ALL
    neuron.set_value(ALL).run()
    assert_serving(at)

    at.session_state[session.SELECTION] = node
    at.run()
    assert_serving(at)
    assert subheaders(at)[-1] == f"Residual {node}"
    layer, t = node[1:].split("_")
    assert f"The residual after layer {layer} at" in markdown(at)
    assert "after the layer of layer" not in markdown(at)  # issue 12
    assert "rank" in at.dataframe[0].value.columns
    at.toggle(key=session.NORMALIZE_LENS).set_value(False).run()
    assert_serving(at)
    at.button(key="go_previous").click().run()
    assert subheaders(at)[-1] == f"Residual A{layer}_{t}"
    assert f"The residual after layer {layer}'s attention at" in markdown(at)
    at.button(key="clear_selection").click().run()
    assert_serving(at)
    assert not subheaders(at)
    assert "selection" not in at.query_params


def test_panels_work_for_parallel_blocks() -> None:
    at = start({"model": "tiny-parallel", "threshold": "0"})
    assert_serving(at)
    ids = graph_ids(at)
    for chosen in (
        next(i for i in ids if "->" in i),
        next(i for i in ids if i.startswith("M")),
        next(i for i in ids if i.startswith("A")),
        "X0_0",
    ):
        at.session_state[session.SELECTION] = chosen
        at.run()
        assert_serving(at)
        assert subheaders(at)
    assert "The embedding at" in markdown(at)


def test_the_ffn_panel_of_a_mixture_of_experts_shows_experts_then_neurons() -> None:
    from app.views.experts import SHARED, WHOLE

    at = start({"model": "tiny-moe", "threshold": "0"})
    assert_serving(at)
    block = next(i for i in graph_ids(at) if i.startswith("M"))
    at.session_state[session.SELECTION] = block
    at.run()
    assert_serving(at)
    assert subheaders(at)[-1] == f"FFN block {block}"
    expert = at.selectbox(key=f"expert|{block}")
    assert expert.value.startswith("e")  # the expert that contributes most
    # The whole block, the 2 routed experts (by their router weights), the shared one.
    assert expert.options[0] == WHOLE and expert.options[-1] == "shared expert (always on)"
    assert len(expert.options) == 1 + 2 + 1
    assert all("router weight" in o for o in expert.options[1:3])
    assert any("router weight" in c.value for c in at.caption)
    chosen = int(expert.value[1:])
    neuron = at.selectbox(key=f"expert_neuron|{block}|{chosen}")
    assert neuron.value == -1  # all of the expert first
    top = int(neuron.options[1].removeprefix("neuron "))
    neuron.set_value(top).run()
    assert_serving(at)
    assert any(f"of expert {chosen} promotes" in m for m in markdown(at).split(" | "))
    at.selectbox(key=f"expert|{block}").set_value(SHARED).run()
    assert_serving(at)
    assert "Tokens the shared expert promotes" in markdown(at)
    at.selectbox(key=f"expert|{block}").set_value(WHOLE).run()
    assert_serving(at)
    assert "whole FFN block promotes" in markdown(at)
    assert len(at.dataframe) >= 2


def test_the_panel_shows_the_edge_weight_exactly_as_drawn() -> None:
    """Issue 12: the hover said 0.306 (renormalized route weight) while the panel said 0.304
    (the graph's weight). Both must come from the route and say when renormalized."""
    import torch

    from app.views.panels import drawn_attention_text, drawn_ffn_text
    from llm_flow.engine.routes import find_route
    from tests.graphs import random_graph

    graph = random_graph()
    route = find_route(graph, [graph.n_tokens - 1], 0.05, renormalize=True)
    idx, weights = route.attention_edges()
    # the edge renormalizing rescales most: its drawn weight differs from the graph's
    i = int(route.attn_factor[idx[:, 0], idx[:, 1]].argmax())
    layer, t, s = idx[i].tolist()
    assert f"{float(weights[i]):.3f}" != f"{float(graph.attention_at(layer, t, s)):.3f}"
    text = drawn_attention_text(route, graph.attention_at(layer, t, s), layer, t, s)
    assert f"**{float(weights[i]):.3f} (renormalized)**" in text and "as drawn" in text
    plain = find_route(graph, [graph.n_tokens - 1], 0.05, renormalize=False)
    if bool(plain.contains(torch.tensor([[layer, t, s]]))[0]):
        assert "renormalized" not in drawn_attention_text(
            plain, graph.attention_at(layer, t, s), layer, t, s
        )
    layer, t = (int(v) for v in route.ffn.nonzero()[0])
    text = drawn_ffn_text(route, graph.ffn[layer, t], graph.ffn_residual[layer, t], layer, t)
    assert f"FFN **{float(route.ffn_weights[layer, t]):.3f}" in text
