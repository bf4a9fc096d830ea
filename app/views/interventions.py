"""Interventions: ablate heads, neurons, experts or the selected edge, scale SAE latents (when
the model has SAEs: :mod:`app.saes`), compare the route before and after, and check the route's
faithfulness.

Wiring only: :func:`llm_flow.analyses.ablation.ablate` (traced, so that
:meth:`~llm_flow.analyses.ablation.AblationResult.route_diff` compares the routes at any τ) and
:func:`llm_flow.analyses.faithfulness.faithfulness` do the work on the view's cached trace;
results are cached in :mod:`app.cache` by everything they were asked with. Mean ablation
averages over a prompt file chosen only from the config's ``prompts_dir``
(``AppConfig.prompt_file``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import streamlit as st

from app import cache, saes, session, stale
from app.cache import AblationKey, CachedTrace, FaithfulnessKey, LoadedModel, MeansKey, ModelKey
from app.figures import tables
from app.prompts import offered_files
from app.saes import LatentEdit
from app.selection import Selection
from app.views.errors import show_error
from llm_flow.analyses.ablation import AblationResult
from llm_flow.analyses.faithfulness import DEFAULT_SEEDS
from llm_flow.analyses.interventions import (
    Ablation,
    EdgeRef,
    MeanActivations,
    Mode,
    parse_experts,
    parse_heads,
    parse_neurons,
)
from llm_flow.analyses.latents import parse_latents
from llm_flow.analyses.route_diff import DEFAULT_FACTOR
from llm_flow.config import AppConfig
from llm_flow.errors import InterventionError, LlmFlowError
from llm_flow.io.figure import diff_figure
from llm_flow.io.text import display_token, markdown_text, position_text

Key = TypeVar("Key", "AblationKey", "FaithfulnessKey")
DEFAULT_MEAN_FILE = "factual.txt"
DIFF_ROWS = 15  # edges listed under the route diff, largest change first
MAX_DRAWS = 50
_PROB = {"prob": st.column_config.NumberColumn(format="%.3f")}
_NUMBER = st.column_config.NumberColumn(format="%.3f")


@dataclass(frozen=True)
class Context:
    """What the interventions act on: the view's trace and the route the graph shows (output
    position and the sidebar's threshold settings), the selection and a valid contrast."""

    cfg: AppConfig
    model_key: ModelKey
    model: LoadedModel
    cached: CachedTrace
    position: int
    threshold: float
    renormalize: bool
    selection: Selection | None
    pair: tuple[str, str] | None  # (target, distractor) when both are valid tokens


def section(ctx: Context) -> None:
    """The "Ablate and check faithfulness" expander below the graph."""
    # A keyed, state-tracking expander stays open across the reruns its own widgets cause (an
    # untracked one was re-created closed whenever the page above it changed).
    with st.expander(
        "Ablate components and check the route's faithfulness",
        key=session.INTERVENTIONS,
        on_change="rerun",
    ):
        mode, mean_file = _mode_controls(ctx.cfg)
        ablation_part(ctx, mode, mean_file)
        st.divider()
        faithfulness_part(ctx, mode, mean_file)


def _mode_controls(cfg: AppConfig) -> tuple[Mode, str | None]:
    """Ablation mode and, for mean ablation, the reference prompt file's name."""
    files = offered_files(cfg)
    ss = st.session_state
    modes = ["zero", "mean"] if files else ["zero"]
    if ss.get(session.ABLATION_MODE) not in modes:
        ss[session.ABLATION_MODE] = "zero"
    left, right = st.columns(2)
    choice = left.radio(
        "Ablation",
        modes,
        key=session.ABLATION_MODE,
        horizontal=True,
        format_func=lambda m: "zero" if m == "zero" else "mean over a prompt file",
        help="Zero removes a component's output; mean replaces it by its average over every "
        "position of every prompt of a file."
        + ("" if files else " (Mean ablation needs prompt files, which this server disabled.)"),
    )
    if choice != "mean":
        return "zero", None
    if ss.get(session.MEAN_FILE) not in files:
        ss[session.MEAN_FILE] = DEFAULT_MEAN_FILE if DEFAULT_MEAN_FILE in files else files[0]
    folder = cfg.prompts_dir.name if cfg.prompts_dir is not None else ""
    name: str = right.selectbox(
        f"Mean over the prompts of (in {folder}/)",
        files,
        key=session.MEAN_FILE,
        help="For a task like IOI, choose prompts of the same task.",
    )
    return "mean", name


def _means(ctx: Context, name: str | None) -> tuple[MeansKey | None, MeanActivations | None]:
    """Mean activations over ``name`` (cached), with a progress bar while they are computed."""
    if name is None:
        return None, None
    key = cache.means_key(ctx.cfg, ctx.model_key, name)
    bar = st.progress(0.0, text=f"Mean activations over {name}…")

    def on_prompt(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Mean activations over {name}: prompt {done} of {total}")

    means = cache.get_means(key, ctx.model, on_prompt=on_prompt)
    bar.empty()
    return key, means


def _ablation(
    heads: list[str],
    neurons: str,
    experts: list[str],
    edge: Selection | None,
    mode: Mode,
    latents: LatentEdit | None,
) -> Ablation:
    edges: tuple[EdgeRef, ...] = ()
    if edge is not None and edge.source is not None:
        edges = (EdgeRef(edge.layer, edge.source, edge.token),)
    ablation = Ablation(
        heads=parse_heads(",".join(heads)),
        neurons=parse_neurons(neurons),
        edges=edges,
        mode=mode,
        experts=parse_experts(",".join(experts)),
    )
    if ablation.is_empty and latents is None:
        raise InterventionError(
            "nothing to ablate; choose heads or experts, type neurons or latents or tick the "
            "selected edge"
        )
    return ablation


def _latent_edit(ctx: Context, text: str, scale: float) -> LatentEdit | None:
    """The typed ``HOOK:I,…`` latents (None when empty) on the SAE the CLI would use."""
    if not text.strip():
        return None
    hook, indices = parse_latents(text.strip())
    return LatentEdit(saes.hook_sae(ctx.model_key.spec, hook), indices, scale)


def _key(
    ctx: Context, ablation: Ablation, mean_file: str | None, latents: LatentEdit | None
) -> AblationKey:
    """The ablation's cache key; the mode and mean file only matter when components are
    ablated (latents alone are scaled, whatever the mode)."""
    if ablation.is_empty:
        return AblationKey(ctx.cached.key, ctx.position, Ablation(), None, ctx.pair, latents)
    means = _means_key(ctx, mean_file)
    return AblationKey(ctx.cached.key, ctx.position, ablation, means, ctx.pair, latents)


def _shown(shown: AblationKey | FaithfulnessKey | None, ctx: Context) -> bool:
    """Whether a result on show belongs to this view (its trace and output position)."""
    return shown is not None and shown.trace == ctx.cached.key and shown.position == ctx.position


ABLATION_LABELS = {
    "ablation": "ablation",
    "latents": "latents",
    "means": "mean file",
    "contrast": "contrast",
}
FAITHFULNESS_LABELS = {
    "threshold": "τ",
    "renormalize": "renormalize",
    "draws": "random draws",
    "mode": "mode",
    "means": "mean file",
    "target": "target",
    "distractor": "distractor",
}


def _means_key(ctx: Context, name: str | None) -> MeansKey | None:
    return None if name is None else cache.means_key(ctx.cfg, ctx.model_key, name)


def _current(build: Callable[[], Key]) -> Key | None:
    """The key the current settings give, or None when they are not valid now."""
    try:
        return build()
    except LlmFlowError:
        return None


def _stale_notice(
    shown: AblationKey | FaithfulnessKey,
    current: AblationKey | FaithfulnessKey | None,
    labels: dict[str, str],
    button_key: str,
) -> bool:
    """A warning above a result computed with other settings than the page's, saying what
    changed, with a "Run again" button; whether that button was clicked."""
    if shown == current:
        return False
    what = stale.changes(shown, current, labels)
    st.warning(
        "**Stale:** the result below was computed with other settings ("
        + markdown_text("; ".join(what))
        + ")."
    )
    return st.button("Run again with the current settings", key=button_key)


# -- ablation ---------------------------------------------------------------------------------


def ablation_part(ctx: Context, mode: Mode, mean_file: str | None) -> None:
    info = ctx.model.llm.info
    units = "heads, experts, neurons" if info.moe_layers else "heads, neurons"
    if saes.model_sae_hooks(ctx.model_key.spec):
        units += ", SAE latents"
    st.markdown(f"**Ablate** {units} or the selected attention edge, and re-run")
    left, middle, right = st.columns([3, 2, 2])  # room for a few head tags
    heads = left.multiselect(
        "Heads (layer.head)",
        [f"{layer}.{head}" for layer in range(info.n_layers) for head in range(info.n_heads)],
        key=session.ABLATE_HEADS,
        placeholder="e.g. 23.0",
    )
    experts: list[str] = []
    if info.moe_layers:
        experts = middle.multiselect(
            "Experts (layer.expert)",
            [f"{layer}.{e}" for layer in info.moe_layers for e in range(info.n_experts)],
            key=session.ABLATE_EXPERTS,
            placeholder="e.g. 3.1",
            help="A routed expert's router weight becomes 0 at every token (mean: its mean "
            "part is added instead); the other experts keep theirs.",
        )
    neurons = ""
    if len(info.moe_layers) < info.n_layers:  # some layers have dense FFNs
        neurons = middle.text_input(
            "Neurons (layer.neuron, …)",
            key=session.ABLATE_NEURONS,
            placeholder=f"e.g. 5.120, 7.3 (0 … {info.d_mlp - 1})",
        )
    selection = ctx.selection
    edge = selection if selection is not None and selection.kind == "attention" else None
    with right:
        if edge is None:
            st.caption("Select an attention edge in the graph to ablate it (all heads, zeroed).")
            use_edge = False
        else:
            use_edge = st.checkbox(f"the selected edge {edge.id}", key=session.ABLATE_EDGE)
    chosen_edge = edge if use_edge else None
    latents, scale = _latent_controls(ctx)

    def current_key() -> AblationKey:
        edit = _latent_edit(ctx, latents, scale)
        ablation = _ablation(heads, neurons, experts, chosen_edge, mode, edit)
        return _key(ctx, ablation, mean_file, edit)

    asked = session.take_ablation_request()  # a latent panel's "ablate this latent"
    clicked = st.button("Run ablation", key="run_ablation") or asked
    shown = session.shown_ablation()
    shown = shown if shown is not None and _shown(shown, ctx) else None
    if shown is not None and not clicked:
        clicked = _stale_notice(shown, _current(current_key), ABLATION_LABELS, "rerun_ablation")
    if clicked:
        try:
            key = current_key()
            _, means = _means(ctx, None if key.means is None else mean_file)
            bar = st.progress(0.0, text="Running the model with the ablation…")

            def on_layer(done: int, total: int) -> None:
                bar.progress(done / total, text=f"Contributions of the ablated run: layer {done}")

            cache.get_ablation(key, ctx.cached, means, on_layer=on_layer)
            bar.empty()
            session.show_ablation(key)
            if shown is not None and shown != key:
                st.rerun()  # drop the stale notice drawn above
            shown = key
        except LlmFlowError as exc:
            show_error(exc, "Fix the components above and run the ablation again.")
    result = cache.cached_ablation(shown) if shown is not None else None
    if result is not None and shown is not None:
        _before_after(result, ctx.pair, shown.latents)
        _route_diff(result, ctx)


def _latent_controls(ctx: Context) -> tuple[str, float]:
    """The latents to scale and the factor, offered when the model has SAEs ("", 0 otherwise)."""
    hooks = saes.model_sae_hooks(ctx.model_key.spec)
    if not hooks:
        return "", 0.0
    ss = st.session_state
    if not isinstance(ss.get(session.LATENT_SCALE), float):
        ss[session.LATENT_SCALE] = 0.0
    left, right = st.columns([5, 2])
    text: str = left.text_input(
        "SAE latents (HOOK:I, …)",
        key=session.ABLATE_LATENTS,
        placeholder=f"e.g. {hooks[0]}:12,40",
        help=f"This model has SAEs on {', '.join(hooks)}. Each latent's part fᵢ·dᵢ is scaled at "
        "every position, where the next layer reads the residual.",
    )
    scale: float = right.number_input("scaled by", step=0.5, key=session.LATENT_SCALE)
    return text, scale


def _before_after(
    result: AblationResult, pair: tuple[str, str] | None, latents: LatentEdit | None
) -> None:
    what = result.ablation.to_dict()
    parts = [
        f"{name} {', '.join(what[name])}"
        for name in ("heads", "neurons", "experts", "edges")
        if what[name]
    ]
    how = f"mean over {result.means_source}" if result.means_source else what["mode"]
    done = [f"Ablated ({how}): {'; '.join(parts)}"] if parts else []
    if latents is not None:
        indices = ",".join(map(str, latents.indices))
        done.append(f"SAE latents {latents.sae.hook}:{indices} scaled by {latents.scale:g}")
    st.caption(f"{'; '.join(done)}.")
    before, after = st.columns(2)
    for column, title, outcome in (
        (before, "Before", result.before),
        (after, "After", result.after),
    ):
        column.markdown(f"**{title}**")
        column.dataframe(
            tables.top_tokens_table(outcome),
            hide_index=True,
            width="stretch",
            column_config=_PROB,
        )
    was, now = result.before.logit_diff, result.after.logit_diff
    if was is not None and now is not None and pair:
        before.metric("logit difference", f"{was:+.2f}")
        after.metric("logit difference", f"{now:+.2f}", delta=f"{now - was:+.2f}")
        st.caption(
            f"Logit difference “{display_token(pair[0])}” − “{display_token(pair[1])}” at "
            f"{position_text(result.position)}."
        )


def _route_diff(result: AblationResult, ctx: Context) -> None:
    """The route before vs after the ablation, at the sidebar's threshold, as a picture and a
    table of the edges that changed most (routes only: both graphs are cached)."""
    diff = result.route_diff(ctx.threshold, ctx.renormalize)
    edges = diff.edges()
    counts = diff.counts(DEFAULT_FACTOR)
    st.markdown("**Route before vs after the ablation**")
    st.caption(
        f"τ = {ctx.threshold:.3f}"
        + (", renormalized" if ctx.renormalize else "")
        + f": {counts['lost']} edges lost (red), {counts['gained']} gained (green), "
        f"{counts['kept']} kept: {counts['weakened']} weakened to ≤ 1/{DEFAULT_FACTOR:g} "
        f"(orange), {counts['strengthened']} strengthened ≥ {DEFAULT_FACTOR:g}× (purple), "
        f"{counts['similar']} similar (grey). Hover an attention edge or FFN block for its "
        "weight before → after."
    )
    st.plotly_chart(
        diff_figure(diff, position=ctx.position),
        key="route_diff",
        config={"displaylogo": False},
    )
    st.dataframe(
        tables.route_diff_table(edges, ctx.cached.trace.tokens).head(DIFF_ROWS),
        hide_index=True,
        width="stretch",
        column_config={name: _NUMBER for name in ("before", "after", "change")},
    )


# -- faithfulness -----------------------------------------------------------------------------


def faithfulness_part(ctx: Context, mode: Mode, mean_file: str | None) -> None:
    pair = ctx.pair
    metric = (
        f"the logit difference “{display_token(pair[0])}” − “{display_token(pair[1])}”"
        if pair
        else "the log-prob of the model's prediction (give a target and a distractor in the "
        "sidebar for the logit difference)"
    )
    st.markdown(f"**Faithfulness** of the route at τ = {ctx.threshold:.3f}")
    st.caption(
        f"Ablates ({mode}) the route's heads and FFN blocks, everything else, and as many random "
        f"heads, and reports how much of {markdown_text(metric)} survives."
    )
    ss = st.session_state
    if not isinstance(ss.get(session.FAITHFULNESS_DRAWS), int):
        ss[session.FAITHFULNESS_DRAWS] = DEFAULT_SEEDS
    draws: int = st.number_input(
        "Random draws",
        min_value=1,
        max_value=MAX_DRAWS,
        step=1,
        key=session.FAITHFULNESS_DRAWS,
        help="How many sets of random heads (as many as the route has) are ablated as the "
        "baseline, one seed each; one forward pass per draw. The table gives their mean share.",
    )
    target, distractor = pair if pair else (None, None)

    def key_of(means_key: MeansKey | None) -> FaithfulnessKey:
        return FaithfulnessKey(
            ctx.cached.key,
            ctx.position,
            ctx.threshold,
            ctx.renormalize,
            draws,
            mode,
            means_key,
            target,
            distractor,
        )

    clicked = st.button("Check faithfulness", key="run_faithfulness")
    shown = session.shown_faithfulness()
    shown = shown if shown is not None and _shown(shown, ctx) else None
    if shown is not None and not clicked:
        current = _current(lambda: key_of(_means_key(ctx, mean_file)))
        clicked = _stale_notice(shown, current, FAITHFULNESS_LABELS, "rerun_faithfulness")
    if clicked:
        try:
            means_key, means = _means(ctx, mean_file)
            key = key_of(means_key)
            bar = st.progress(0.0, text="Faithfulness: ablating…")

            def on_step(done: int, total: int) -> None:
                bar.progress(done / total, text=f"Faithfulness: forward pass {done} of {total}")

            cache.get_faithfulness(key, ctx.cached, means, on_step=on_step)
            bar.empty()
            session.show_faithfulness(key)
            if shown is not None and shown != key:
                st.rerun()  # drop the stale notice drawn above
            shown = key
        except LlmFlowError as exc:
            show_error(exc, "Change the ablation settings above and check again.")
    report = cache.cached_faithfulness(shown) if shown is not None else None
    if report is None or shown is None:
        return
    st.dataframe(
        tables.faithfulness_table(report),
        hide_index=True,
        width="stretch",
        column_config={
            name: st.column_config.NumberColumn(format="%.2f")
            for name in ("logit diff", "target log-prob", "share of full")
        },
    )
    st.caption(
        f"τ = {report.threshold:.3f}"
        + (", renormalized" if shown.renormalize else "")
        + f", {shown.mode} ablation: {report.n_route_heads} of {report.total_heads} head "
        f"positions and {report.n_route_ffn} of {report.total_ffn} FFN blocks are on the route. "
        f"Random heads: share {report.random_share_mean:.2f} ± {report.random_share_sd:.2f} "
        f"over {len(report.random)} draws. "
        "A route that matters keeps much when only it is kept and loses much when it is ablated, "
        "far more than random heads."
    )
