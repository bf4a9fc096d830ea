"""Tests for llm_flow/analyses/dataset.py and ``llm-flow dataset``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from llm_flow.analyses.dataset import (
    COLUMNS,
    DatasetError,
    compare_prompts,
    compare_tables,
    dataset_frequencies,
    route_appearances,
    write_table,
)
from llm_flow.analyses.faithfulness import head_mask
from llm_flow.engine.routes import find_route
from llm_flow.engine.trace import trace
from llm_flow.models.base import LayerRun
from llm_flow.models.bridge import BridgeLlm
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import prompt, tiny_hf_model, tiny_llm, tiny_tokenizer

TAU = 0.01
PROMPTS = [prompt(n, seed=s) for s, n in enumerate((4, 6, 5, 7))]
L, H = 3, 4


@pytest.fixture(scope="module")
def llm() -> BridgeLlm:
    return tiny_llm("llama-gqa")


@pytest.fixture(scope="module")
def table(llm: BridgeLlm) -> pd.DataFrame:
    seen: list[tuple[int, int]] = []
    frame = dataset_frequencies(
        llm, PROMPTS, threshold=TAU, on_prompt=lambda d, t: seen.append((d, t))
    )
    assert seen == [(i + 1, len(PROMPTS)) for i in range(len(PROMPTS))]
    return frame


def test_table_shape_and_columns(table: pd.DataFrame) -> None:
    assert tuple(table.columns) == COLUMNS
    heads = table[table["kind"] == "head"]
    ffn = table[table["kind"] == "ffn"]
    assert len(heads) == L * H * 2 and len(ffn) == L * 2
    assert set(table["position_class"]) == {"last", "other"}
    assert heads[["layer", "head", "position_class"]].drop_duplicates().shape[0] == len(heads)
    assert ffn["head"].isna().all() and heads["head"].notna().all()


def test_frequencies_and_counts_are_consistent(table: pd.DataFrame) -> None:
    n = len(PROMPTS)
    assert (table["n_prompts"] == n).all()
    assert table["frequency"].between(0, 1).all()
    assert (table["count"] == (table["frequency"] * n).round().astype(int)).all()
    assert (table["count"] <= n).all() and (table["appearances"] >= table["count"]).all()
    seen = table["appearances"] > 0
    assert (table.loc[~seen, "mean_weight"] == 0).all()
    heads = table["kind"] == "head"
    # A head only counts when its per-head contribution reached τ.
    assert (table.loc[seen & heads, "mean_weight"] >= TAU).all()
    assert table["mean_weight"].between(0, 1).all()
    assert table["count"].sum() > 0  # not vacuous


def test_counts_match_the_routes_prompt_by_prompt(llm: BridgeLlm, table: pd.DataFrame) -> None:
    """Recount with faithfulness's per-position head mask (an independent code path)."""
    want_last = torch.zeros(L, H, dtype=torch.long)
    want_other = torch.zeros(L, H, dtype=torch.long)
    ffn_last = torch.zeros(L, dtype=torch.long)
    for text in PROMPTS:
        tr = trace(llm, text)
        run, route = tr.run, find_route(tr.graph, [-1], TAU, renormalize=False)
        mask = head_mask(run, route, TAU)  # [L, T, H]
        want_last += mask[:, -1].long()
        want_other += mask[:, :-1].any(1).long()
        ffn_last += route.ffn[:, -1].long()
    heads = table[table["kind"] == "head"].sort_values(["layer", "head"])
    got_last = torch.tensor(heads[heads["position_class"] == "last"]["count"].tolist())
    got_other = torch.tensor(heads[heads["position_class"] == "other"]["count"].tolist())
    assert torch.equal(got_last.reshape(L, H), want_last)
    assert torch.equal(got_other.reshape(L, H), want_other)
    ffn = table[(table["kind"] == "ffn") & (table["position_class"] == "last")]
    assert torch.equal(torch.tensor(ffn.sort_values("layer")["count"].tolist()), ffn_last)


def test_threshold_zero_puts_every_ffn_at_the_last_token_on_every_route(llm: BridgeLlm) -> None:
    frame = dataset_frequencies(llm, PROMPTS[:2], threshold=0.0)
    last_ffn = frame[(frame["kind"] == "ffn") & (frame["position_class"] == "last")]
    assert (last_ffn["frequency"] == 1.0).all()
    last_heads = frame[(frame["kind"] == "head") & (frame["position_class"] == "last")]
    assert (last_heads["frequency"] == 1.0).all()


def test_appearances_of_one_route_split_by_position_class(llm: BridgeLlm) -> None:
    tr = trace(llm, PROMPTS[1], attention_floor=0.0)  # every causal edge is stored
    run, route = tr.run, find_route(tr.graph, [-1], 0.0, renormalize=False)
    a = route_appearances(run, route, 0.0)
    p = run.n_tokens - 1
    # τ = 0: every head on every edge; edges into the last token = p + 1 sources per layer.
    assert torch.all(a.head_hits[:, 0] == p + 1)
    assert torch.all(a.ffn_hits[:, 0] == 1)
    assert torch.all(a.ffn_hits[-1, 1] == 0)  # the last layer only matters at the output


def test_compare_tables_gives_b_minus_a(table: pd.DataFrame, llm: BridgeLlm) -> None:
    same = compare_tables(table, table)
    assert (same.diff["frequency_diff"] == 0).all() and len(same.diff) == len(table)
    other = dataset_frequencies(llm, PROMPTS[:1], threshold=TAU)
    comparison = compare_tables(table, other)
    merged = comparison.diff
    assert (merged["frequency_diff"] == merged["frequency_b"] - merged["frequency_a"]).all()
    assert comparison.a is table and comparison.b is other


def test_compare_prompts(llm: BridgeLlm) -> None:
    seen: list[tuple[int, int]] = []
    result = compare_prompts(
        llm,
        PROMPTS[:2],
        PROMPTS[2:],
        threshold=TAU,
        on_prompt=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert (result.a["n_prompts"] == 2).all() and (result.b["n_prompts"] == 2).all()


# -- tables ------------------------------------------------------------------------------------


def test_write_table_csv_and_parquet(table: pd.DataFrame, tmp_path: Path) -> None:
    write_table(table, tmp_path / "r.csv")
    back = pd.read_csv(tmp_path / "r.csv")
    assert list(back.columns) == list(COLUMNS) and len(back) == len(table)
    write_table(table, tmp_path / "r.parquet")
    assert pd.read_parquet(tmp_path / "r.parquet").equals(table)
    with pytest.raises(DatasetError, match=".csv or .parquet"):
        write_table(table, tmp_path / "r.xlsx")


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dataset-cli")
    config = {"models": {"tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))}}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "prompts.txt").write_text("\n".join(PROMPTS[:2]))
    return folder


def cli(capsys: pytest.CaptureFixture[str], folder: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "dataset", "--config", str(folder / "config.json"), *argv)


def test_cli_writes_csv(capsys: pytest.CaptureFixture[str], files: Path) -> None:
    out_file = files / "results.csv"
    prompts = str(files / "prompts.txt")
    code, out, err = cli(
        capsys, files, "--prompts", prompts, "--threshold", "0.01", "--out", str(out_file)
    )
    assert (code, out, err) == (0, "", "")
    frame = pd.read_csv(out_file)
    assert {"layer", "head", "frequency", "mean_weight", "position_class", "kind"} <= set(
        frame.columns
    )
    code, out, err = cli(capsys, files, "--prompts", prompts, "--threshold", "0.01")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == ",".join(COLUMNS) and len(out.splitlines()) == len(frame) + 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--prompts", "/nonexistent/p.txt"), "cannot read prompt file"),
        (("--prompts", "{prompts}", "--out", "x.xlsx"), ".csv or .parquet"),
        (("--prompts", "{prompts}", "--threshold", "-1"), "threshold must be between 0 and 1"),
    ],
)
def test_cli_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], files: Path, argv: tuple[str, ...], needle: str
) -> None:
    args = [a.replace("{prompts}", str(files / "prompts.txt")) for a in argv]
    code, out, err = cli(capsys, files, *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("llm-flow: error: ")
    assert needle in err


# -- mixture of experts -----------------------------------------------------------------------


def slow_expert_shares(layer: LayerRun, t: int) -> dict[int | None, float]:
    """Each expert's share at t (None: the shared expert), from the definition in float64:
    proximity of every part of resid_post[t] — routed expert parts, the shared expert's, the
    bias, the residual — normalized over all of them."""
    ex = layer.experts
    assert ex is not None
    y = layer.resid_post[t].double()
    scale = float(layer.mlp_scale[t])
    parts: dict[object, torch.Tensor] = {}
    for slot in range(ex.index.shape[1]):
        e = int(ex.index[t, slot])
        out = ex.acts[t, slot].double() @ ex.W_out[e].double() + ex.b_out[e].double()
        parts[e] = float(ex.weight[t, slot]) * out * scale
    shared = ex.shared_output(torch.float64)
    if shared is not None:
        parts[None] = shared[t] * scale
    parts["bias"] = layer.b_out.expand_as(layer.resid_pre)[t].double() * scale
    parts["base"] = layer.mlp_base[t].double()
    prox = {k: max(float(y.abs().sum() - (y - z).abs().sum()), 0.0) for k, z in parts.items()}
    total = sum(prox.values())
    return {k: v / total for k, v in prox.items() if k not in ("bias", "base")}  # type: ignore[misc]


def loud_moe() -> BridgeLlm:
    """The tiny MoE with expert outputs 30× larger, so experts carry route-sized shares."""
    hf = tiny_hf_model("qwen2-moe")
    with torch.no_grad():
        for block in hf.model.layers:
            block.mlp.experts.down_proj.mul_(30)
            block.mlp.shared_expert.down_proj.weight.mul_(30)
    return BridgeLlm("loud-moe", hf, tiny_tokenizer())


def test_experts_are_counted_on_routes_as_heads_are() -> None:
    moe = loud_moe()
    tau = 0.02
    table = dataset_frequencies(moe, PROMPTS, threshold=tau)
    experts = table[table["kind"] == "expert"]
    shared = table[table["kind"] == "shared_expert"]
    assert len(experts) == L * 4 * 2 and len(shared) == L * 2
    assert experts["expert"].notna().all() and experts["head"].isna().all()
    assert table[table["kind"] == "ffn"]["expert"].isna().all()
    want: dict[tuple[object, int, str], int] = {}
    for text in PROMPTS:
        tr = trace(moe, text)
        route = find_route(tr.graph, [-1], tau, renormalize=False)
        seen: set[tuple[object, int, str]] = set()
        for layer, t in route.ffn.nonzero().tolist():
            cls = "last" if t == tr.n_tokens - 1 else "other"
            for e, share in slow_expert_shares(tr.run.layers[layer], t).items():
                if share >= tau:
                    seen.add((e, layer, cls))
        for key in seen:
            want[key] = want.get(key, 0) + 1
    got = {
        (None if kind == "shared_expert" else int(e), int(layer), cls): int(count)
        for kind, e, layer, cls, count in zip(
            table["kind"],
            table["expert"],
            table["layer"],
            table["position_class"],
            table["count"],
            strict=True,
        )
        if kind in ("expert", "shared_expert") and count
    }
    assert got == want and sum(want.values()) > 0
