"""Dataset mode: how often each head and FFN block is on the routes of a prompt file's prompts.

The head-frequency analysis of Ferrando & Voita 2024 (§5), computed by
:mod:`llm_flow.analyses.dataset`; this module picks the files (only from the config's
``prompts_dir``), shows the layer × head heatmaps (last token vs the other tokens), compares two
files side by side and offers the tables as CSV and parquet.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pandas as pd
import streamlit as st

from app import cache, session
from app.cache import DatasetKey, LoadedModel, ModelKey, PromptFileKey
from app.figures.dataset import frequency_figure
from app.prompts import offered_files
from app.views.errors import show_error
from llm_flow.analyses.dataset import DatasetComparison
from llm_flow.config import AppConfig
from llm_flow.errors import DatasetError, LlmFlowError
from llm_flow.io.text import markdown_text

NONE = "—"
TOP_ROWS = 15
PARQUET_MIME = "application/vnd.apache.parquet"
PLOTLY_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["select2d", "lasso2d"]}


def section(
    cfg: AppConfig, model_key: ModelKey, threshold: float, load: Callable[[], LoadedModel]
) -> None:
    """The dataset tab; ``load`` loads the model (only when the user runs a dataset)."""
    files = offered_files(cfg)
    if not files:
        st.info(
            "Dataset mode runs the prompt files of the config's prompts folder; this server has "
            "none to offer (prompts_dir is empty or unset, or loading files is disabled)."
        )
        return
    # The slider's τ is not named here: a slider step reruns only the route view, so a number
    # here would lag behind it; the tables below say the τ they were computed at.
    st.markdown(
        "Run the route to the **last token** of every prompt of a file at the τ of the route "
        "graph's slider and count how often each head and FFN block is on it."
    )
    left, right = st.columns(2)
    name_a: str = left.selectbox("Prompt file", files, key=session.DATASET_A)
    name_b: str = right.selectbox(
        "Compare with (optional)",
        [NONE, *files],
        key=session.DATASET_B,
        help="A second file: both are run and shown side by side, with their difference.",
    )
    if st.button("Run the prompts", key="run_dataset"):
        try:
            if name_b == name_a:
                raise DatasetError("choose two different files to compare, or none as the second")
            key = DatasetKey(
                model_key,
                cache.prompt_file_key(cfg, name_a),
                None if name_b == NONE else cache.prompt_file_key(cfg, name_b),
                threshold,
            )
            model = load()
            bar = st.progress(0.0, text="Running the prompts…")

            def on_prompt(done: int, total: int) -> None:
                bar.progress(done / total, text=f"Prompt {done} of {total}")

            cache.get_dataset(key, model, on_prompt=on_prompt)
            bar.empty()
            session.show_dataset(key)
        except LlmFlowError as exc:
            show_error(exc, "Choose other prompt files and run again.")
    session.note_dataset_drawn(None)
    shown = session.shown_dataset()
    if shown is None or shown.model != model_key:
        return
    result = cache.cached_dataset(shown)
    if result is None:
        return
    session.note_dataset_drawn(threshold)  # the route view reruns the page when τ moves on
    if shown.threshold != threshold:
        st.warning(
            f"**Stale:** these tables were computed at τ = {shown.threshold:.3f}; the sidebar's "
            f"τ is now {threshold:.3f}. Press “Run the prompts” to run them again."
        )
    if isinstance(result, DatasetComparison) and shown.b is not None:
        _comparison(result, shown, shown.b)
    elif isinstance(result, pd.DataFrame):
        _single(result, shown)


def _caption(frame: pd.DataFrame, name: str, threshold: float) -> str:
    n = int(frame["n_prompts"].iloc[0])
    return (
        f"{name}: {n} prompts at τ = {threshold:.3f}. Colour: the share of prompts whose route "
        "goes through the head (per-head contribution ≥ τ on a route edge) or FFN block."
    )


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


INTEGER_COLUMNS = ("layer", "head", "expert", "count", "n_prompts")


def export_frame(frame: pd.DataFrame, key: DatasetKey) -> pd.DataFrame:
    """The table as downloaded: the settings that made it (model, dtype, τ) on every row, and
    unit numbers as integers (FFN rows have no head: empty, never ``3.0``)."""
    out = frame.copy()
    for column in INTEGER_COLUMNS:
        if column in out.columns and pd.api.types.is_numeric_dtype(out[column]):
            out[column] = out[column].round().astype("Int64")
    settings = {"model": key.model.spec.name, "dtype": key.model.dtype, "threshold": key.threshold}
    for i, (name, value) in enumerate(settings.items()):
        out.insert(i, name, value)
    return out


def _downloads(frame: pd.DataFrame, label: str, stem: str, key: str) -> None:
    """``frame`` as CSV (button ``key``) and parquet (``key``_parquet), side by side."""
    csv, parquet = st.columns(2)
    csv.download_button(
        f"{label} CSV",
        data=frame.to_csv(index=False),
        file_name=f"{stem}.csv",
        mime="text/csv",
        on_click="ignore",
        key=key,
    )
    parquet.download_button(
        f"{label} parquet",
        data=_parquet(frame),
        file_name=f"{stem}.parquet",
        mime=PARQUET_MIME,
        on_click="ignore",
        key=f"{key}_parquet",
    )


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _single(frame: pd.DataFrame, key: DatasetKey) -> None:
    st.plotly_chart(frequency_figure(frame), key="dataset_figure", config=PLOTLY_CONFIG)
    st.caption(_caption(frame, key.a.name, key.threshold))
    top = frame.sort_values(["frequency", "mean_weight"], ascending=False).head(TOP_ROWS)
    st.dataframe(top, hide_index=True, width="stretch")
    _downloads(export_frame(frame, key), "Table", f"{_stem(key.a.name)}-routes", "download_dataset")


def _comparison(result: DatasetComparison, key: DatasetKey, b: PromptFileKey) -> None:
    left, right = st.columns(2)
    for column, frame, file_key, tag in (
        (left, result.a, key.a, "a"),
        (right, result.b, b, "b"),
    ):
        with column:
            st.markdown(f"**{markdown_text(file_key.name)}** ({tag})")
            st.plotly_chart(
                frequency_figure(frame), key=f"dataset_figure_{tag}", config=PLOTLY_CONFIG
            )
            st.caption(_caption(frame, file_key.name, key.threshold))
    st.markdown(f"**Difference** {markdown_text(b.name)} − {markdown_text(key.a.name)} (b − a)")
    st.plotly_chart(
        frequency_figure(result.diff, value="frequency_diff"),
        key="dataset_figure_diff",
        config=PLOTLY_CONFIG,
    )
    diff = result.diff.sort_values("frequency_diff", key=abs, ascending=False)
    st.dataframe(diff.head(TOP_ROWS), hide_index=True, width="stretch")
    columns = st.columns(3)
    with columns[0]:
        _downloads(
            export_frame(result.diff, key), "Difference", "dataset-difference", "download_diff"
        )
    with columns[1]:
        _downloads(
            export_frame(result.a, key), key.a.name, f"{_stem(key.a.name)}-routes", "download_a"
        )
    with columns[2]:
        _downloads(export_frame(result.b, key), b.name, f"{_stem(b.name)}-routes", "download_b")
