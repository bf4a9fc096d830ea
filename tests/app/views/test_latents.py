"""Tests for app/views/latents.py and the latents of app/views/interventions.py: a residual
node's SAE latents, b_dec and error (the numbers of ``lf.latents``), and scaling a latent with
the route before and after (``lf.ablate_latents``), with AppTest on the tiny model and a random
SAE in SAELens's format attached through the config's ``"saes"``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import llm_flow as lf
from app import cache, latents_cache, session
from app.figures.tables import (
    B_DEC,
    BIAS,
    DIFF_COLUMN,
    EDGE_LATENT_COLUMNS,
    ERROR,
    LATENT_COLUMNS,
)
from llm_flow.models.sae import save_sae
from tests.app.apptest import CONTRAST, assert_serving, errors, start
from tests.app.conftest import PROMPTS, write_config
from tests.unit.analyses.test_latents import random_sae

pytestmark = pytest.mark.usefixtures("offline")

HOOK = "blocks.1.hook_resid_post"  # the tiny model has 3 layers: I1 is ablatable at layer 2
NODE = "I1_4"


@pytest.fixture
def sae_config(
    tmp_path: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path]:
    """(config, SAE folder): the app's test config with an SAE on ``HOOK`` for model "tiny"."""
    folder = save_sae(random_sae(HOOK), tmp_path / "sae")
    path = write_config(tmp_path / "app", model_dirs)
    config = json.loads(path.read_text())
    config["models"]["tiny"]["saes"] = {HOOK: str(folder)}
    path.write_text(json.dumps(config))
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))  # no trained SAEs
    monkeypatch.setenv("LLM_FLOW_CONFIG", str(path))
    return path, folder


def latents_table(at: AppTest) -> pd.DataFrame:
    (table,) = [d.value for d in at.dataframe if list(d.value.columns[:4]) == LATENT_COLUMNS]
    return table


def select_node(at: AppTest, node: str) -> None:
    at.session_state[session.SELECTION] = node
    at.run()
    assert_serving(at)


def test_a_residual_node_lists_its_latents_b_dec_and_the_error(
    sae_config: tuple[Path, Path],
) -> None:
    config, folder = sae_config
    at = start(CONTRAST)
    select_node(at, NODE)
    table = latents_table(at)
    tr = lf.trace(lf.load("tiny", config=config), PROMPTS[0])
    want = lf.latents(
        tr, NODE, folder, target=CONTRAST["target"], distractor=CONTRAST["distractor"]
    )
    # Listed latents, the rest together, then b_dec and the error: always, summing to 1.
    assert list(table["latent"].iloc[-2:]) == [B_DEC, ERROR]
    assert table["contribution"].sum() == pytest.approx(1, abs=1e-6)
    listed = table.iloc[: len(want.latents)]
    assert list(listed["latent"]) == [str(latent.index) for latent in want.latents]
    for column, field in [
        ("activation", "activation"),
        ("contribution", "contribution"),
        ("direct effect", "direct_effect"),
        (DIFF_COLUMN, "direct_effect_diff"),
    ]:
        got = list(listed[column])
        assert got == pytest.approx([getattr(latent, field) for latent in want.latents], abs=1e-5)
    b_dec, error = table.iloc[-2], table.iloc[-1]
    assert b_dec["contribution"] == pytest.approx(want.b_dec_contribution, abs=1e-6)
    assert error["contribution"] == pytest.approx(want.error_contribution, abs=1e-6)
    assert error["direct effect"] == pytest.approx(want.error_direct_effect, abs=1e-5)
    assert [b_dec[DIFF_COLUMN], error[DIFF_COLUMN]] == pytest.approx(
        [want.b_dec_direct_effect_diff, want.error_direct_effect_diff], abs=1e-5
    )
    summary = " | ".join(m.value for m in at.markdown)
    assert f"**{want.l0}** active latents" in summary
    assert f"explained variance **{want.explained_variance:.3f}**" in summary
    computed = latents_cache.store().latents.computed
    at.slider(key=session.THRESHOLD).set_value(0.1).run()  # another route, the same node
    assert latents_cache.store().latents.computed == computed and latents_table(at).equals(table)

    # Without a contrast there is no target − distractor column.
    at.text_input(key=session.TARGET).set_value("")
    at.text_input(key=session.DISTRACTOR).set_value("").run()
    assert DIFF_COLUMN not in latents_table(at).columns


def test_ablating_a_selected_latent_shows_the_route_before_and_after(
    sae_config: tuple[Path, Path],
) -> None:
    config, folder = sae_config
    at = start(CONTRAST | {"threshold": "0.02"})
    select_node(at, NODE)
    index = int(latents_table(at)["latent"].iloc[0])
    at.session_state[f"latents|{NODE}"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert any("covers the latents of the SAE" in i.value for i in at.info)  # none built yet
    at.button(key=f"ablate_latent|{NODE}|{index}").click().run()
    assert_serving(at)
    assert at.text_input(key=session.ABLATE_LATENTS).value == f"{HOOK}:{index}"
    assert any(f"SAE latents {HOOK}:{index} scaled by 0" in c.value for c in at.caption)
    assert any("edges lost" in c.value for c in at.caption)  # the route diff
    tr = lf.trace(lf.load("tiny", config=config), PROMPTS[0])
    want = lf.ablate_latents(
        tr, folder, [index], target=CONTRAST["target"], distractor=CONTRAST["distractor"]
    )
    assert want.after.logit_diff is not None
    *_, before, after = [float(m.value) for m in at.metric if m.label == "logit difference"]
    assert after == pytest.approx(want.after.logit_diff, abs=0.011)  # shown to 2 decimals
    assert abs(after - before) > 0.02  # removing the strongest latent moves it

    # Typed latents with a factor: scaling them up is another run.
    at.text_input(key=session.ABLATE_LATENTS).input(f"{HOOK}:{index}, 1")
    at.number_input(key=session.LATENT_SCALE).set_value(3.0)
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    assert any(f"SAE latents {HOOK}:{index},1 scaled by 3" in c.value for c in at.caption)

    # Another factor marks the result stale; latents alone take no mean file in mean mode.
    at.number_input(key=session.LATENT_SCALE).set_value(2.0).run()
    stale = re.sub(r"\\(.)", r"\1", " | ".join(w.value for w in at.warning))  # unescaped
    assert f"latents {HOOK}:{index},1 ×3 → {HOOK}:{index},1 ×2" in stale
    means = cache.store().means.computed
    at.radio(key=session.ABLATION_MODE).set_value("mean").run()
    at.button(key="run_ablation").click().run()
    assert_serving(at)
    assert not at.warning and cache.store().means.computed == means
    assert any(f"SAE latents {HOOK}:{index},1 scaled by 2." in c.value for c in at.caption)


def test_without_an_sae_the_tab_says_how_to_attach_one_and_bad_saes_are_errors(
    sae_config: tuple[Path, Path], tmp_path: Path
) -> None:
    at = start()
    select_node(at, "I0_2")  # no SAE on layer 0
    assert any("llm-flow sae train --layer 0" in c.value for c in at.caption)
    at.text_input(key=session.ABLATE_LATENTS).input("blocks.0.hook_resid_post:1")
    at.button(key="run_ablation").click().run()
    assert "has no SAE on 'blocks.0.hook_resid_post'" in errors(at)
    select_node(at, "X0_2")
    assert any('"blocks.0.hook_resid_pre": PATH_OR_REPO' in c.value for c in at.caption)

    config, _ = sae_config  # an SAE of another width: an error in words, the app serves on
    save_sae(random_sae(HOOK, d_in=16), tmp_path / "narrow")
    data = json.loads(config.read_text())
    data["models"]["tiny"]["saes"] = {HOOK: str(tmp_path / "narrow")}
    config.write_text(json.dumps(data))
    at = start()
    at.session_state[session.SELECTION] = NODE
    at.run()
    assert "16-dimensional" in errors(at)
    assert not at.exception and any(s.value == f"Residual {NODE}" for s in at.subheader)


def test_an_edge_from_a_node_with_an_sae_splits_over_its_latents(
    sae_config: tuple[Path, Path],
) -> None:
    config, folder = sae_config
    edge = "I1_2->A2_5"  # from I1_2, which has the SAE
    at = start({"threshold": "0"})
    select_node(at, edge)
    (table,) = [d.value for d in at.dataframe if list(d.value.columns) == EDGE_LATENT_COLUMNS]
    want = lf.edge_latents(lf.trace(lf.load("tiny", config=config), PROMPTS[0]), edge, folder)
    listed = table.iloc[: len(want.latents)]
    assert list(listed["part"]) == [f"latent {latent.index}" for latent in want.latents]
    assert list(listed["contribution"]) == pytest.approx(
        [latent.contribution for latent in want.latents], abs=1e-6
    )
    assert list(table["part"].iloc[-3:]) == [B_DEC, BIAS, ERROR]  # always shown
    assert list(table["contribution"].iloc[-3:]) == pytest.approx(
        [want.b_dec_contribution, want.bias_contribution, want.error_contribution], abs=1e-6
    )
    assert table["contribution"].sum() == pytest.approx(1, abs=1e-6)
    at.button(key=f"source_latents|{edge}").click().run()
    assert_serving(at)
    assert at.session_state[session.SELECTION] == "I1_2"
    assert list(latents_table(at)["latent"].iloc[-2:]) == [B_DEC, ERROR]
    select_node(at, "I0_2->A1_5")  # from I0_2: no SAE, no split
    assert not any(list(d.value.columns) == EDGE_LATENT_COLUMNS for d in at.dataframe)


def test_a_latent_builds_the_index_of_its_sae_and_shows_its_examples(
    sae_config: tuple[Path, Path],
) -> None:
    config, folder = sae_config
    at = start({"threshold": "0"})
    select_node(at, NODE)
    index = int(latents_table(at)["latent"].iloc[0])
    at.session_state[f"latents|{NODE}"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    key = f"{NODE}|{HOOK}:{index}"
    at.selectbox(key=f"corpus|{key}").set_value("more.txt").run()
    assert any("covers the latents of the SAE" in i.value for i in at.info)
    at.button(key=f"build_index|{key}").click().run()
    assert_serving(at)
    (shown,) = [
        list(d.value["activation"])
        for d in at.dataframe
        if list(d.value.columns) == ["activation", "context"]
    ]
    model = lf.load("tiny", config=config)
    want = lf.top_latent_examples(
        model, f"{HOOK}:{index}", sae=folder, corpus=config.parent / "prompts" / "more.txt"
    )
    assert shown and shown == pytest.approx([e.activation for e in want.examples[: len(shown)]])
