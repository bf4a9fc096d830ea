"""The llm-flow explorer: ``streamlit run app/main.py -- config/local.json`` (``make run``), or
``llm-flow app`` from anywhere (an installed wheel runs its bundled copy of this file).

Wiring only: the config, the session (:mod:`app.session`), the sidebar
(:mod:`app.views.controls`) and the two tabs (:mod:`app.views.route`,
:mod:`app.views.dataset`). The config path is the first argument after ``--``, else
``$LLM_FLOW_CONFIG``, else the bundled ``config/local.json`` (:mod:`llm_flow.resources`).

Every error a user can cause is shown as ``st.error`` saying what to do, and the page stops
there (:func:`app.views.errors.guarded`); the sidebar stays usable, so the app keeps serving
after bad input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the folder that holds the `app` package:
# the repository root (which, without an editable install, also holds `llm_flow`), or in an
# installed wheel llm_flow/bundle/, so `app` is importable only inside the server.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from app import session  # noqa: E402
from app.views import controls, dataset, loading, route  # noqa: E402
from app.views.errors import guarded  # noqa: E402
from llm_flow.config import AppConfig, default_config, load_config  # noqa: E402
from llm_flow.errors import ConfigError  # noqa: E402
from llm_flow.io.text import markdown_text  # noqa: E402

CONFIG_ENV = "LLM_FLOW_CONFIG"


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


def page() -> None:
    try:
        cfg = _config()
    except ConfigError as exc:
        message = markdown_text(str(exc).rstrip("."))
        st.error(f"{message}.  \nFix the config file and reload the page.")
        st.stop()
    # Tracebacks never reach a user (errors are caught below); "debug" shows them to developers.
    st.set_option("client.showErrorDetails", "full" if cfg.debug else "none")
    session.init_session(cfg)
    for notice in session.take_notices():
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
    sidebar = route.Sidebar(
        model_key, model_label, prompt, settings, target, distractor, info_slot, position_slot
    )

    route_tab, dataset_tab = st.tabs(["Route", "Dataset mode"])
    # The dataset tab first: an error in the route tab stops the page (st.stop) after it.
    with dataset_tab:
        dataset.section(cfg, model_key, settings.threshold, lambda: loading.model(model_key))
    with route_tab:  # its errors show inside it
        guarded(lambda: route.route_tab(cfg, sidebar))


def main() -> None:
    st.set_page_config(page_title="llm-flow", page_icon="🔀", layout="wide")
    st.set_option("client.toolbarMode", "viewer")  # no "Deploy" button on a local tool
    guarded(page)


main()
