"""The llm-flow explorer: ``streamlit run app/main.py -- config/local.json`` (``make run``).

Wiring only: the sidebar (:mod:`app.controls`), the cached model and trace (:mod:`app.state`),
the route (``llm_flow.engine.routes``), the figure (:mod:`app.figures`) and the panel beside it
(:mod:`app.panels`). The config path is the first argument after ``--``, else
``$LLM_FLOW_CONFIG``, else the repository's ``config/local.json``.

Every error a user can cause is shown as ``st.error`` saying what to do, and the page stops
there; the sidebar stays usable, so the app keeps serving after bad input.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root that holds the
# `app` package (and, without an editable install, `llm_flow`).
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import plotly.graph_objects as go  # noqa: E402
import streamlit as st  # noqa: E402
import torch  # noqa: E402
from streamlit.delta_generator import DeltaGenerator  # noqa: E402

from app import contrast, controls, dataset, figures, interventions, panels, state  # noqa: E402
from app.figures import markdown_text  # noqa: E402
from app.prompts import check_prompt  # noqa: E402
from app.selection import parse_selection  # noqa: E402
from app.state import LoadedModel, ModelKey, Trace, TraceKey  # noqa: E402
from llm_flow.config import AppConfig, default_config, load_config  # noqa: E402
from llm_flow.engine.routes import Route, find_route  # noqa: E402
from llm_flow.errors import (  # noqa: E402
    ConfigError,
    DeviceError,
    LlmFlowError,
    ModelLoadError,
    OfflineError,
    PromptError,
)
from llm_flow.io.export import graph_json, to_graphml  # noqa: E402

CONFIG_ENV = "LLM_FLOW_CONFIG"
GRAPH_CONFIG = {
    "displaylogo": False,
    "scrollZoom": True,
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"],
    # The toolbar's camera button saves the figure client-side, so SVG export needs no kaleido.
    "toImageButtonOptions": {"format": "svg", "filename": "llm-flow-route"},
}
_log = logging.getLogger("llm_flow.app")


def config_path() -> str | None:
    """``streamlit run app/main.py -- PATH`` wins; then ``$LLM_FLOW_CONFIG``.

    ``sys.argv`` is only ours when this file is the script being run (under pytest's AppTest
    it holds pytest's own arguments).
    """
    if len(sys.argv) > 1 and Path(sys.argv[0]).resolve() == Path(__file__).resolve():
        return sys.argv[1]
    return os.environ.get(CONFIG_ENV) or None


def _config() -> AppConfig:
    path = config_path()
    return load_config(path) if path else default_config()


_HINTS: list[tuple[type[LlmFlowError], str]] = [
    (OfflineError, "Choose a packaged model in the sidebar, or connect to the internet once."),
    (ModelLoadError, "Choose another model in the sidebar, or fix this model's config entry."),
    (DeviceError, "Choose the cpu device (and float32) in the sidebar."),
    (PromptError, "Edit the prompt or choose another one in the sidebar."),
    (ConfigError, "Fix the custom model name in the sidebar."),
]


def _fail(exc: LlmFlowError) -> None:
    message = (str(exc) or type(exc).__name__).rstrip(".")
    hint = next((h for kind, h in _HINTS if isinstance(exc, kind)), "Change the input and retry.")
    st.error(f"{markdown_text(message[0].upper() + message[1:])}.  \n{hint}")
    st.stop()


def _load(key: ModelKey) -> LoadedModel:
    cached = state.cached_model(key)
    if cached is not None:
        return cached
    slot = st.empty()  # the status box goes away once the model is there
    with slot.status(f"Loading {key.spec.name} on {key.device} ({key.dtype})…") as status:
        model = state.get_model(key, progress=status.write)
    slot.empty()
    st.toast(f"Loaded {key.spec.name} in {model.load_seconds:.1f} s")
    return model


def _trace(key: TraceKey, model: LoadedModel) -> Trace:
    cached = state.cached_trace(key)
    if cached is not None:
        return cached
    slot = st.empty()
    with slot.status("Running the model and computing contributions…"):
        bar = st.progress(0.0)

        def on_layer(done: int, total: int) -> None:
            bar.progress(done / total, text=f"layer {done} of {total}")

        result = state.get_trace(key, model, on_layer=on_layer)
    slot.empty()
    return result


def _downloads(trace: Trace, route: Route, position: int, figure: go.Figure) -> None:
    """Graph as JSON/GraphML (the CLI's contract) and the figure; built only when clicked."""
    prediction = trace.predictions[position]

    def data() -> dict[str, object]:
        return graph_json(trace.graph, route, prediction, position=position, run=trace.run)

    columns = st.columns(4 if importlib.util.find_spec("kaleido") else 3)
    columns[0].download_button(
        "Graph JSON",
        data=lambda: json.dumps(data(), indent=1),
        file_name="llm-flow-route.json",
        mime="application/json",
        on_click="ignore",
        key="download_json",
    )
    columns[1].download_button(
        "Graph GraphML",
        data=lambda: to_graphml(data()),
        file_name="llm-flow-route.graphml",
        mime="application/xml",
        on_click="ignore",
        key="download_graphml",
    )
    columns[2].download_button(
        "Figure HTML",
        data=lambda: figure.to_html(include_plotlyjs=True, full_html=True),
        file_name="llm-flow-route.html",
        mime="text/html",
        on_click="ignore",
        key="download_html",
        help="Interactive, works offline. For SVG use the camera button of the figure.",
    )
    if len(columns) > 3:
        columns[3].download_button(
            "Figure PNG",
            data=lambda: figure.to_image(format="png", scale=2),
            file_name="llm-flow-route.png",
            mime="image/png",
            on_click="ignore",
            key="download_png",
        )


def page() -> None:
    try:
        cfg = _config()
    except ConfigError as exc:
        message = markdown_text(str(exc).rstrip("."))
        st.error(f"{message}.  \nFix the config file and reload the page.")
        st.stop()
    # Tracebacks never reach a user (errors are caught below); "debug" shows them to developers.
    st.set_option("client.showErrorDetails", "full" if cfg.debug else "none")
    state.init_session(cfg)
    for notice in state.take_notices():
        st.warning(markdown_text(notice))

    with st.sidebar:
        st.title("llm-flow")
        st.caption("Information-flow routes in transformer LMs")
        model_key, model_label = controls.model_controls(cfg)
        info_slot = st.container()
        st.divider()
        prompt = controls.prompt_controls(cfg)
        st.divider()
        settings = controls.graph_controls()
        position_slot = st.container()
        st.divider()
        target, distractor = controls.contrast_controls()
    slots = (info_slot, position_slot)

    route_tab, dataset_tab = st.tabs(["Route", "Dataset mode"])
    # The dataset tab first: an error in the route tab stops the page (st.stop) after it.
    with dataset_tab:
        dataset.section(cfg, model_key, settings.threshold, lambda: _load(model_key))
    with route_tab:  # its errors show inside it
        guarded(
            lambda: explore(
                cfg, model_key, model_label, prompt, settings, (target, distractor), slots
            )
        )


def explore(
    cfg: AppConfig,
    model_key: ModelKey,
    model_label: str,
    prompt: str | None,
    settings: controls.GraphSettings,
    contrast_tokens: tuple[str, str],
    slots: tuple[DeltaGenerator, DeltaGenerator],
) -> None:
    """The route tab: graph, panel, contrast, ablation and faithfulness."""
    info_slot, position_slot = slots
    target, distractor = contrast_tokens
    if prompt is None:
        raise controls.NeedsInput("There are no prompts yet: add one in the sidebar.")
    check_prompt(prompt, cfg.max_user_string_length)
    model = _load(model_key)
    with info_slot:
        controls.model_info(model)
    trace = _trace(TraceKey(model_key, prompt), model)
    graph = trace.graph
    state.start_view((model_label, prompt), graph.n_tokens)
    with position_slot:
        position = controls.position_control(trace)

    route = find_route(graph, [position], settings.threshold, settings.renormalize)
    # Before the selection is read: a newly selected table row selects its edge or block.
    contrast_view = contrast.prepare(trace, model, route, target, distractor)
    chosen = state.selection()
    selection = parse_selection(chosen, graph.n_layers, graph.n_tokens)
    if chosen and selection is None:
        st.warning(
            markdown_text(f"{chosen!r} is not part of this graph; the selection was cleared.")
        )
        state.select(None)

    state.write_query_params(
        {
            "model": model_label,
            "prompt": prompt,
            "position": position,
            "threshold": f"{settings.threshold:g}",
            "selection": selection.id if selection else None,
            "renormalize": None if settings.renormalize else "0",
            "normalize": None if settings.normalize_lens else "0",
            "target": target,
            "distractor": distractor,
        }
    )

    prediction = trace.predictions[position]
    graph_column, panel_column = st.columns([3, 2], gap="medium")
    with graph_column:
        st.markdown(
            f"**{markdown_text(model_label)}** predicts "
            f"**“{markdown_text(figures.display_token(prediction.token))}”** "
            f"(p = {prediction.prob:.2f}) after "
            f"“{markdown_text(figures.display_token(graph.tokens[position]))}” "
            f"(token {position} of {graph.n_tokens})"
        )
        contrast.summary(contrast_view)
        st.caption(
            f"Route: {route.n_edges} edges at τ = {settings.threshold:.3f}"
            + (", renormalized" if settings.renormalize else "")
            + ". Edge width and opacity follow the weight. Drag to pan, scroll to zoom, "
            "double-click to reset."
        )
        figure = figures.flow_figure(
            graph, route, trace.predictions, position=position, selection=selection
        )
        st.plotly_chart(
            figure,
            key=state.GRAPH,
            on_select=state.on_graph_select,
            selection_mode="points",
            config=GRAPH_CONFIG,
        )
        _downloads(trace, route, position, figure)
        if cfg.debug:
            st.caption(
                f"trace {trace.seconds:.2f} s · load {model.load_seconds:.1f} s · "
                f"cached models {len(state.store().models)}, traces {len(state.store().traces)}"
            )
    with panel_column:
        panels.selection_panel(
            selection, panels.PanelContext(trace, model, route, settings.normalize_lens)
        )
    contrast.contrast_section(contrast_view)
    interventions.section(
        cfg,
        model_key,
        model,
        trace,
        position,
        settings.threshold,
        settings.renormalize,
        selection,
        contrast_view.pair,
    )


def guarded(view: Callable[[], None]) -> None:
    """Run ``view``; an error a user can fix becomes ``st.error`` where the view was, and the
    page stops there (``st.stop``)."""
    try:
        view()
    except controls.NeedsInput as need:
        st.info(markdown_text(str(need)))
        st.stop()
    except LlmFlowError as exc:
        _fail(exc)
    except torch.cuda.OutOfMemoryError:
        st.error(
            "The GPU ran out of memory.  \nTry a shorter prompt, float16/bfloat16, or the cpu."
        )
        st.stop()
    except Exception as exc:  # a bug: keep serving, log the traceback for the operator
        _log.exception("llm-flow app error")
        st.error(
            f"Something went wrong: {markdown_text(f'{type(exc).__name__}: {exc}')}.  \n"
            "Try another prompt or "
            "model; if it persists, report it with this page's URL (the server log has the "
            "details)."
        )
        st.stop()


def main() -> None:
    st.set_page_config(page_title="llm-flow", page_icon="🔀", layout="wide")
    st.set_option("client.toolbarMode", "viewer")  # no "Deploy" button on a local tool
    guarded(page)


main()
