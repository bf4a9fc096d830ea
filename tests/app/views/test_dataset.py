"""Tests for app/views/dataset.py: the "Dataset mode" tab, with AppTest on the tiny local models."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app import cache, session
from app.views.dataset import NONE
from tests.app.apptest import (
    assert_serving,
    download_keys,
    downloaded,
    errors,
    route_caption,
    start,
)
from tests.app.conftest import FILE_PROMPTS, PROMPTS, Downloads

pytestmark = pytest.mark.usefixtures("offline")


def heatmaps(at: AppTest) -> list[dict[str, Any]]:
    """The specs of the dataset figures (heatmaps of route frequencies)."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return [s for s in specs if s["data"] and s["data"][0].get("type") == "heatmap"]


def test_one_file_gives_heatmaps_a_table_and_a_csv() -> None:
    at = start()
    assert at.selectbox(key=session.DATASET_A).options == ["more.txt", "preloaded.jsonl"]
    at.selectbox(key=session.DATASET_A).set_value("more.txt")
    at.button(key="run_dataset").click().run()
    assert_serving(at)
    (figure,) = heatmaps(at)
    assert len(figure["data"]) == 2  # last token, other tokens
    assert list(figure["data"][0]["x"]) == ["0", "1", "2", "3", "FFN"]  # tiny: 4 heads
    table = next(d.value for d in at.dataframe if "frequency" in d.value.columns)
    assert set(table["n_prompts"]) == {len(FILE_PROMPTS)}
    assert any(f"{len(FILE_PROMPTS)} prompts" in c.value for c in at.caption)
    assert {"download_dataset", "download_dataset_parquet"} <= download_keys(at)

    # The result is cached: running again computes nothing.
    computed = cache.store().datasets.computed
    at.button(key="run_dataset").click().run()
    assert cache.store().datasets.computed == computed


def test_the_parquet_download_holds_the_csv_table(downloads: Downloads) -> None:
    at = start()
    at.selectbox(key=session.DATASET_A).set_value("more.txt")
    at.button(key="run_dataset").click().run()
    assert_serving(at)
    csv, csv_mime, csv_name = downloaded(at, downloads, "download_dataset")
    parquet, parquet_mime, parquet_name = downloaded(at, downloads, "download_dataset_parquet")
    assert (csv_mime, csv_name) == ("text/csv", "more-routes.csv")
    assert (parquet_mime, parquet_name) == ("application/vnd.apache.parquet", "more-routes.parquet")
    assert parquet.startswith(b"PAR1")
    from_csv = pd.read_csv(io.BytesIO(csv))
    from_parquet = pd.read_parquet(io.BytesIO(parquet))
    assert len(from_csv) > 0 and set(from_csv["n_prompts"]) == {len(FILE_PROMPTS)}
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False)
    # issue 12: the CSV records the settings, and head numbers are integers (was "3.0")
    assert set(from_csv["threshold"]) == {0.04} and set(from_csv["model"]) == {"tiny"}
    heads = csv.decode().splitlines()
    column = heads[0].split(",").index("head")
    assert all("." not in line.split(",")[column] for line in heads[1:])
    assert from_csv["head"].notna().any()


def test_dataset_tables_from_another_threshold_are_marked_stale() -> None:
    at = start()
    at.selectbox(key=session.DATASET_A).set_value("more.txt")
    at.button(key="run_dataset").click().run()
    assert not any("Stale" in w.value for w in at.warning)
    at.slider(key=session.THRESHOLD).set_value(0.1).run()
    assert any("Stale" in w.value and "0.040" in w.value for w in at.warning)


def test_two_files_side_by_side_with_their_difference() -> None:
    at = start()
    at.selectbox(key=session.DATASET_A).set_value("more.txt")
    at.selectbox(key=session.DATASET_B).set_value("preloaded.jsonl")
    at.button(key="run_dataset").click().run()
    assert_serving(at)
    assert len(heatmaps(at)) == 3  # a, b and b − a
    diff = next(d.value for d in at.dataframe if "frequency_diff" in d.value.columns)
    assert (diff["frequency_diff"] == diff["frequency_b"] - diff["frequency_a"]).all()
    keys = download_keys(at)
    for key in ("download_diff", "download_a", "download_b"):
        assert {key, f"{key}_parquet"} <= keys
    assert len(PROMPTS) and route_caption(at)  # the route tab is still there


def test_comparing_a_file_with_itself_is_refused_and_the_app_keeps_serving() -> None:
    at = start()
    at.selectbox(key=session.DATASET_A).set_value("more.txt")
    at.selectbox(key=session.DATASET_B).set_value("more.txt")
    at.button(key="run_dataset").click().run()
    assert "two different files" in errors(at)
    assert route_caption(at) and not at.exception
    at.selectbox(key=session.DATASET_B).set_value(NONE)
    at.button(key="run_dataset").click().run()
    assert_serving(at)


def test_a_broken_prompt_file_shows_an_error(config_path: Path) -> None:
    broken = config_path.parent / "prompts" / "broken.jsonl"
    broken.write_text("not json\n", encoding="utf-8")
    try:
        at = start()
        at.selectbox(key=session.DATASET_A).set_value("broken.jsonl")
        at.button(key="run_dataset").click().run()
        assert "invalid JSON" in errors(at)
        assert route_caption(at) and not at.exception
    finally:
        broken.unlink()


def test_demo_mode_has_no_dataset_files(demo_config_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FLOW_CONFIG", str(demo_config_path))
        at = start()
    assert_serving(at)
    assert any("Dataset mode runs the prompt files" in i.value for i in at.info)
