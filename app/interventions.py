"""Interventions: ablate heads, neurons or the selected edge, compare the route before and after,
and check the route's faithfulness.

Wiring only: :func:`llm_flow.analyses.interventions.ablate`,
:func:`~llm_flow.analyses.interventions.ablated_trace` (with
:class:`llm_flow.analyses.route_diff.RouteDiff`) and
:func:`llm_flow.analyses.faithfulness.faithfulness` do the work; results are cached in
:mod:`app.state` by everything they were asked with. Mean ablation averages over a prompt file
chosen only from the config's ``prompts_dir`` (``AppConfig.prompt_file``).
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from app import figures, state
from app.figures import display_token, markdown_text
from app.prompts import prompt_files
from app.selection import Selection
from app.state import (
    AblatedGraphKey,
    AblationKey,
    FaithfulnessKey,
    LoadedModel,
    MeansKey,
    ModelKey,
    Trace,
)
from llm_flow.analyses.faithfulness import DEFAULT_SEEDS
from llm_flow.analyses.interventions import (
    Ablation,
    EdgeRef,
    MeanActivations,
    parse_heads,
    parse_neurons,
)
from llm_flow.analyses.route_diff import STATUSES, RouteDiff
from llm_flow.config import AppConfig
from llm_flow.engine.graph import FlowGraph
from llm_flow.engine.routes import find_route
from llm_flow.errors import LlmFlowError

DEFAULT_MEAN_FILE = "factual.txt"
DIFF_ROWS = 15  # edges listed under the route diff, largest change first
MAX_DRAWS = 50
_PROB = {"prob": st.column_config.NumberColumn(format="%.3f")}


@dataclass(frozen=True)
class RouteView:
    """The route the graph shows: output position and the sidebar's threshold settings."""

    position: int
    threshold: float
    renormalize: bool


def _error(exc: LlmFlowError, hint: str) -> None:
    message = (str(exc) or type(exc).__name__).rstrip(".")
    st.error(f"{markdown_text(message[0].upper() + message[1:])}.  \n{hint}")


def _mean_files(cfg: AppConfig) -> list[str]:
    if cfg.demo_mode or not cfg.allow_loading_dataset_files:
        return []
    return prompt_files(cfg.prompts_dir)


def _mode_controls(cfg: AppConfig) -> tuple[str, str | None]:
    """Ablation mode and, for mean ablation, the reference prompt file's name."""
    files = _mean_files(cfg)
    ss = st.session_state
    modes = ["zero", "mean"] if files else ["zero"]
    if ss.get(state.ABLATION_MODE) not in modes:
        ss[state.ABLATION_MODE] = "zero"
    left, right = st.columns(2)
    mode: str = left.radio(
        "Ablation",
        modes,
        key=state.ABLATION_MODE,
        horizontal=True,
        format_func=lambda m: "zero" if m == "zero" else "mean over a prompt file",
        help="Zero removes a component's output; mean replaces it by its average over every "
        "position of every prompt of a file."
        + ("" if files else " (Mean ablation needs prompt files, which this server disabled.)"),
    )
    if mode != "mean":
        return mode, None
    if ss.get(state.MEAN_FILE) not in files:
        ss[state.MEAN_FILE] = DEFAULT_MEAN_FILE if DEFAULT_MEAN_FILE in files else files[0]
    folder = cfg.prompts_dir.name if cfg.prompts_dir is not None else ""
    name: str = right.selectbox(
        f"Mean over the prompts of (in {folder}/)",
        files,
        key=state.MEAN_FILE,
        help="For a task like IOI, choose prompts of the same task.",
    )
    return mode, name


def _means(
    cfg: AppConfig, model_key: ModelKey, model: LoadedModel, name: str | None
) -> tuple[MeansKey | None, MeanActivations | None]:
    """Mean activations over ``name`` (cached), with a progress bar while they are computed."""
    if name is None:
        return None, None
    key = state.means_key(cfg, model_key, name)
    bar = st.progress(0.0, text=f"Mean activations over {name}…")

    def on_prompt(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Mean activations over {name}: prompt {done} of {total}")

    means = state.get_means(key, model, on_prompt=on_prompt)
    bar.empty()
    return key, means


def _ablation(heads: list[str], neurons: str, edge: Selection | None, mode: str) -> Ablation:
    edges: tuple[EdgeRef, ...] = ()
    if edge is not None and edge.source is not None:
        edges = (EdgeRef(edge.layer, edge.source, edge.token),)
    return Ablation(
        heads=parse_heads(",".join(heads)),
        neurons=parse_neurons(neurons),
        edges=edges,
        mode="mean" if mode == "mean" else "zero",
    )


def section(
    cfg: AppConfig,
    model_key: ModelKey,
    model: LoadedModel,
    trace: Trace,
    position: int,
    threshold: float,
    renormalize: bool,
    selection: Selection | None,
    pair: tuple[str, str] | None,
) -> None:
    """The "Ablate and check faithfulness" expander below the graph (``threshold`` and
    ``renormalize``: the sidebar's, so the check tests the route the graph shows)."""
    # A keyed, state-tracking expander stays open across the reruns its own widgets cause (an
    # untracked one was re-created closed whenever the page above it changed).
    with st.expander(
        "Ablate components and check the route's faithfulness",
        key=state.INTERVENTIONS,
        on_change="rerun",
    ):
        mode, mean_file = _mode_controls(cfg)
        ablation_part(
            cfg,
            model_key,
            model,
            trace,
            RouteView(position, threshold, renormalize),
            selection,
            pair,
            mode,
            mean_file,
        )
        st.divider()
        faithfulness_part(
            cfg, model_key, model, trace, position, threshold, renormalize, pair, mode, mean_file
        )


def ablation_part(
    cfg: AppConfig,
    model_key: ModelKey,
    model: LoadedModel,
    trace: Trace,
    view: RouteView,
    selection: Selection | None,
    pair: tuple[str, str] | None,
    mode: str,
    mean_file: str | None,
) -> None:
    info = model.llm.info
    position = view.position
    st.markdown("**Ablate** heads, neurons or the selected attention edge, and re-run")
    left, middle, right = st.columns([3, 2, 2])  # room for a few head tags
    heads = left.multiselect(
        "Heads (layer.head)",
        [f"{layer}.{head}" for layer in range(info.n_layers) for head in range(info.n_heads)],
        key=state.ABLATE_HEADS,
        placeholder="e.g. 23.0",
    )
    neurons = middle.text_input(
        "Neurons (layer.neuron, …)",
        key=state.ABLATE_NEURONS,
        placeholder=f"e.g. 5.120, 7.3 (0 … {info.d_mlp - 1})",
    )
    edge = selection if selection is not None and selection.kind == "attention" else None
    with right:
        if edge is None:
            st.caption("Select an attention edge in the graph to ablate it (all heads, zeroed).")
            use_edge = False
        else:
            use_edge = st.checkbox(f"the selected edge {edge.id}", key=state.ABLATE_EDGE)
    if st.button("Run ablation", key="run_ablation"):
        try:
            ablation = _ablation(heads, neurons, edge if use_edge else None, mode)
            if ablation.is_empty:
                raise LlmFlowError(
                    "nothing to ablate; choose heads, type neurons or tick the selected edge"
                )
            means_key, means = _means(cfg, model_key, model, mean_file)
            key = AblationKey(trace.key, position, ablation, means_key, pair)
            with st.spinner("Running the model with and without the ablation…"):
                state.get_ablation(key, model, means)
            bar = st.progress(0.0, text="Contributions of the ablated run…")

            def on_layer(done: int, total: int) -> None:
                bar.progress(done / total, text=f"Contributions of the ablated run: layer {done}")

            state.get_ablated_graph(_graph_key(key), model, means, on_layer=on_layer)
            bar.empty()
            state.show_ablation(key)
        except LlmFlowError as exc:
            _error(exc, "Fix the heads or neurons above and run the ablation again.")
    shown = state.shown_ablation()
    if shown is None or shown.trace != trace.key or shown.position != position:
        return
    result = state.cached_ablation(shown)
    if result is None:
        return
    what = result.ablation.to_dict()
    parts = [
        f"{name} {', '.join(what[name])}" for name in ("heads", "neurons", "edges") if what[name]
    ]
    how = f"mean over {result.means_source}" if result.means_source else what["mode"]
    st.caption(f"Ablated ({how}): {'; '.join(parts)}.")
    before, after = st.columns(2)
    before.markdown("**Before**")
    before.dataframe(
        figures.top_tokens_table(result.before),
        hide_index=True,
        width="stretch",
        column_config=_PROB,
    )
    after.markdown("**After**")
    after.dataframe(
        figures.top_tokens_table(result.after),
        hide_index=True,
        width="stretch",
        column_config=_PROB,
    )
    if result.before.logit_diff is not None and result.after.logit_diff is not None and pair:
        change = result.after.logit_diff - result.before.logit_diff
        before.metric("logit difference", f"{result.before.logit_diff:+.2f}")
        after.metric(
            "logit difference",
            f"{result.after.logit_diff:+.2f}",
            delta=f"{change:+.2f}",
        )
        st.caption(
            f"Logit difference “{display_token(pair[0])}” − “{display_token(pair[1])}” at "
            f"token {result.position}."
        )
    graph = state.cached_ablated_graph(_graph_key(shown))
    if graph is not None:
        _route_diff(trace, graph, view)


def _graph_key(key: AblationKey) -> AblatedGraphKey:
    return AblatedGraphKey(key.trace, key.ablation, key.means)


def _route_diff(trace: Trace, ablated: FlowGraph, view: RouteView) -> None:
    """The route before vs after the ablation, at the sidebar's threshold, as a picture and a
    table of the edges that changed most."""
    diff = RouteDiff(
        find_route(trace.graph, [view.position], view.threshold, view.renormalize),
        find_route(ablated, [view.position], view.threshold, view.renormalize),
    )
    edges = diff.edges()
    counts = {status: sum(e.status == status for e in edges) for status in STATUSES}
    st.markdown("**Route before vs after the ablation**")
    st.caption(
        f"τ = {view.threshold:.3f}"
        + (", renormalized" if view.renormalize else "")
        + f": {counts['kept']} edges kept, {counts['lost']} lost (red), "
        f"{counts['gained']} gained (green). Hover an attention edge or FFN block for its "
        "weight before → after."
    )
    st.plotly_chart(
        figures.diff_figure(diff, position=view.position),
        key="route_diff",
        config={"displaylogo": False},
    )
    st.dataframe(
        figures.route_diff_table(edges, trace.graph.tokens).head(DIFF_ROWS),
        hide_index=True,
        width="stretch",
        column_config={
            name: st.column_config.NumberColumn(format="%.3f")
            for name in ("before", "after", "change")
        },
    )


def faithfulness_part(
    cfg: AppConfig,
    model_key: ModelKey,
    model: LoadedModel,
    trace: Trace,
    position: int,
    threshold: float,
    renormalize: bool,
    pair: tuple[str, str] | None,
    mode: str,
    mean_file: str | None,
) -> None:
    metric = (
        f"the logit difference “{display_token(pair[0])}” − “{display_token(pair[1])}”"
        if pair
        else "the log-prob of the model's prediction (give a target and a distractor in the "
        "sidebar for the logit difference)"
    )
    st.markdown(f"**Faithfulness** of the route at τ = {threshold:.3f}")
    st.caption(
        f"Ablates ({mode}) the route's heads and FFN blocks, everything else, and as many random "
        f"heads, and reports how much of {markdown_text(metric)} survives."
    )
    ss = st.session_state
    if not isinstance(ss.get(state.FAITHFULNESS_DRAWS), int):
        ss[state.FAITHFULNESS_DRAWS] = DEFAULT_SEEDS
    draws: int = st.number_input(
        "Random draws",
        min_value=1,
        max_value=MAX_DRAWS,
        step=1,
        key=state.FAITHFULNESS_DRAWS,
        help="How many sets of random heads (as many as the route has) are ablated as the "
        "baseline, one seed each; one forward pass per draw. The table gives their mean share.",
    )
    if st.button("Check faithfulness", key="run_faithfulness"):
        try:
            means_key, means = _means(cfg, model_key, model, mean_file)
            target, distractor = pair if pair else (None, None)
            key = FaithfulnessKey(
                trace.key,
                position,
                threshold,
                renormalize,
                draws,
                mode,
                means_key,
                target,
                distractor,
            )
            bar = st.progress(0.0, text="Faithfulness: ablating…")

            def on_step(done: int, total: int) -> None:
                bar.progress(done / total, text=f"Faithfulness: forward pass {done} of {total}")

            state.get_faithfulness(key, model, means, on_step=on_step)
            bar.empty()
            state.show_faithfulness(key)
        except LlmFlowError as exc:
            _error(exc, "Change the ablation settings above and check again.")
    shown = state.shown_faithfulness()
    if shown is None or shown.trace != trace.key or shown.position != position:
        return
    report = state.cached_faithfulness(shown)
    if report is None:
        return
    st.dataframe(
        figures.faithfulness_table(report),
        hide_index=True,
        width="stretch",
        column_config={
            "logit diff": st.column_config.NumberColumn(format="%.2f"),
            "target log-prob": st.column_config.NumberColumn(format="%.2f"),
            "share of full": st.column_config.NumberColumn(format="%.2f"),
        },
    )
    st.caption(
        f"τ = {report.threshold:.3f}: {report.n_route_heads} of {report.total_heads} head "
        f"positions and {report.n_route_ffn} of {report.total_ffn} FFN blocks are on the route. "
        f"Random heads: share {report.random_share_mean:.2f} ± {report.random_share_sd:.2f} "
        f"over {len(report.random)} draws. "
        "A route that matters keeps much when only it is kept and loses much when it is ablated, "
        "far more than random heads."
    )
