"""Tests for llm_flow/cli/: the CLI contract of docs/architecture.md, on tiny local models.

``graph`` output is checked against the contract field by field, and against the model itself
(token ids, prediction); structural invariants (edge endpoints, causality, weight sums) are
checked on every node. Every error is exit code 2 with exactly one stderr line.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch

from llm_flow.cli import main
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny
from tests.tiny import WORDS, prompt, tiny_hf_model

N_LAYERS, N_HEADS = 3, 4
WORDS_IN_PROMPT = 6
PROMPT = prompt(WORDS_IN_PROMPT)
T = WORDS_IN_PROMPT + 1  # with BOS
MAX_CHARS = 1000  # above the 129-token prompt's length, below the long one
INFO_FIELDS = {
    "name": "tiny",
    "n_layers": 3,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_model": 32,
    "d_mlp": 48,
    "d_vocab": 64,
    "post_norm": False,
    "parallel_blocks": False,
    "device": "cpu",
    "dtype": "float32",
}
NODE_ID = re.compile(r"^(?:X0_(?P<xt>\d+)|(?P<kind>[AMI])(?P<layer>\d+)_(?P<t>\d+))$")
KINDS = {"X": "embedding", "A": "after_attention", "M": "ffn", "I": "after_layer"}
TOP_KEYS = {
    "model",
    "tokens",
    "token_ids",
    "n_layers",
    "threshold",
    "renormalize",
    "position",
    "prediction",
    "nodes",
    "edges",
}


@pytest.fixture(scope="module")
def config_file(saved_tiny: SavedTiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "empty-model").mkdir()
    config = {
        "models": {
            "tiny": {"source": "local", "path": str(saved_tiny("llama-gqa"))},
            "tiny-gpt2": {"source": "local", "path": str(saved_tiny("gpt2-bias"))},
            "empty": {"source": "local", "path": str(folder / "empty-model")},
        },
        "default_model": "tiny",
        "max_user_string_length": MAX_CHARS,
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


cli = run_cli


def graph(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "graph", "--config", str(config), "--prompt", PROMPT, *extra)
    assert (code, err) == (0, ""), err
    data: dict[str, Any] = json.loads(out)
    return data


def assert_one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    assert lines[0].startswith("llm-flow: error: "), lines[0]
    assert len(lines[0]) > len("llm-flow: error: ") + 10
    return lines[0]


def parse_node(node_id: str) -> tuple[str, int, int]:
    m = NODE_ID.match(node_id)
    assert m, f"bad node id {node_id!r}"
    if m["xt"] is not None:
        return "X", 0, int(m["xt"])
    return m["kind"], int(m["layer"]), int(m["t"])


def in_weight_sums(data: dict[str, Any]) -> dict[str, float]:
    """Σ weight of the edges into each A (attention + residual) and I (ffn + residual) node."""
    sums: dict[str, float] = defaultdict(float)
    for edge in data["edges"]:
        if parse_node(edge["target"])[0] in "AI":
            sums[edge["target"]] += edge["weight"]
    return sums


def check_structure(data: dict[str, Any]) -> None:
    """Everything the JSON contract promises about any graph or route."""
    assert set(data) == TOP_KEYS
    n_tokens, n_layers = len(data["token_ids"]), data["n_layers"]
    assert isinstance(data["model"], str)
    assert all(isinstance(t, str) for t in data["tokens"])
    assert all(type(i) is int for i in data["token_ids"])
    assert len(data["tokens"]) == n_tokens
    assert type(n_layers) is int and type(data["position"]) is int
    assert type(data["threshold"]) is float and type(data["renormalize"]) is bool
    assert 0 <= data["position"] < n_tokens
    pred = data["prediction"]
    assert set(pred) == {"token", "id", "prob"}
    assert isinstance(pred["token"], str) and type(pred["id"]) is int
    assert type(pred["prob"]) is float and 0 < pred["prob"] <= 1

    ids = [node["id"] for node in data["nodes"]]
    assert len(ids) == len(set(ids))
    for node in data["nodes"]:
        assert set(node) == {"id", "layer", "token", "kind"}
        kind, layer, token = parse_node(node["id"])
        assert (node["layer"], node["token"], node["kind"]) == (layer, token, KINDS[kind])
        assert 0 <= token < n_tokens and 0 <= layer < n_layers
    assert f"I{n_layers - 1}_{data['position']}" in ids

    node_set = set(ids)
    for edge in data["edges"]:
        assert set(edge) - {"heads"} == {"source", "target", "weight", "kind"}
        assert edge["source"] in node_set and edge["target"] in node_set, edge
        assert type(edge["weight"]) is float and 0 <= edge["weight"] <= 1 + 1e-6
        src, dst = parse_node(edge["source"]), parse_node(edge["target"])
        if edge["kind"] == "attention":
            assert dst[0] == "A"
            layer, t, s = dst[1], dst[2], src[2]
            assert src[:2] == (("X", 0) if layer == 0 else ("I", layer - 1))
            assert s <= t, edge
        elif edge["kind"] == "residual":
            assert src[2] == dst[2]
            if dst[0] == "A":
                assert src[:2] == (("X", 0) if dst[1] == 0 else ("I", dst[1] - 1))
            else:
                assert (src[0], dst[0], src[1]) == ("A", "I", dst[1])
        else:
            assert edge["kind"] == "ffn"
            pair = (src[0], dst[0])
            assert pair in {("A", "M"), ("M", "I")}
            assert (src[1], src[2]) == (dst[1], dst[2])


def reaches_output(data: dict[str, Any]) -> set[str]:
    """Nodes from which the output node can be reached along the route's edges."""
    into: dict[str, list[str]] = defaultdict(list)
    for edge in data["edges"]:
        into[edge["target"]].append(edge["source"])
    start = f"I{data['n_layers'] - 1}_{data['position']}"
    seen, stack = {start}, [start]
    while stack:
        for src in into[stack.pop()]:
            if src not in seen:
                seen.add(src)
                stack.append(src)
    return seen


# -- info ------------------------------------------------------------------------------------------


def test_info_prints_the_contract_fields(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, err = cli(capsys, "info", "--config", str(config_file))
    assert (code, err) == (0, "")
    info = json.loads(out)
    assert {k: info[k] for k in INFO_FIELDS} == INFO_FIELDS
    assert info["n_params"] == sum(p.numel() for p in tiny_hf_model("llama-gqa").parameters())


def test_info_reports_the_chosen_model_and_dtype(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = cli(
        capsys, "info", "--config", str(config_file), "--model", "tiny-gpt2", "--dtype", "bfloat16"
    )
    info = json.loads(out)
    assert code == 0
    assert (info["name"], info["architecture"], info["dtype"]) == (
        "tiny-gpt2",
        "GPT2LMHeadModel",
        "bfloat16",
    )
    assert (info["n_kv_heads"], info["d_mlp"]) == (4, 128)


# -- graph: the full graph -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_graphs(saved_tiny: SavedTiny, config_file: Path) -> dict[str, dict[str, Any]]:
    """``graph --threshold 0 --no-renormalize`` of both tiny models (read once per module)."""
    out = {}
    for model in ("tiny", "tiny-gpt2"):
        buffer = io.StringIO()
        argv = ["graph", "--config", str(config_file), "--model", model, "--prompt", PROMPT]
        with contextlib.redirect_stdout(buffer):
            code = main([*argv, "--threshold", "0", "--no-renormalize"])
        assert code == 0
        out[model] = json.loads(buffer.getvalue())
    return out


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
def test_full_graph_matches_the_contract(full_graphs: dict[str, Any], model: str) -> None:
    data = full_graphs[model]
    check_structure(data)
    assert data["model"] == model
    assert (data["threshold"], data["renormalize"], data["position"]) == (0.0, False, T - 1)
    assert data["n_layers"] == N_LAYERS


def test_token_ids_are_what_the_model_consumed(full_graphs: dict[str, Any]) -> None:
    data = full_graphs["tiny"]
    words = PROMPT.split()
    assert data["token_ids"] == [0, *(WORDS.index(w) + 3 for w in words)]
    assert data["tokens"] == ["<bos>", *words]
    with torch.no_grad():
        logits = tiny_hf_model("llama-gqa")(torch.tensor([data["token_ids"]])).logits[0, -1]
    probs = logits.softmax(-1)
    assert data["prediction"]["id"] == int(probs.argmax())
    assert data["prediction"]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
def test_full_graph_has_every_edge(full_graphs: dict[str, Any], model: str) -> None:
    data = full_graphs[model]
    kinds: dict[str, int] = defaultdict(int)
    for edge in data["edges"]:
        kinds[edge["kind"]] += 1
    assert kinds == {
        "attention": N_LAYERS * T * (T + 1) // 2,
        "residual": 2 * N_LAYERS * T,
        "ffn": 2 * N_LAYERS * T,
    }
    assert len(data["nodes"]) == T + 3 * N_LAYERS * T


def test_full_graph_weights_are_shares_of_each_whole(full_graphs: dict[str, Any]) -> None:
    # llama-gqa has no output bias: attention + residual shares sum to exactly 1.
    for target, total in in_weight_sums(full_graphs["tiny"]).items():
        assert total == pytest.approx(1.0, abs=1e-5), target
    # gpt2-bias: the output bias takes its own share, so attention + residual ≤ 1; the FFN whole
    # (FFN out incl. its bias + resid_mid) still sums to 1.
    sums = in_weight_sums(full_graphs["tiny-gpt2"])
    for target, total in sums.items():
        if target.startswith("A"):  # a bias larger than everything else can take it all
            assert 0 <= total <= 1 + 1e-5, target
        else:
            assert total == pytest.approx(1.0, abs=1e-5), target
    assert len(sums) == 2 * N_LAYERS * T
    assert any(0 < total < 1 - 1e-3 for total in sums.values())


def test_ffn_edges_carry_the_same_weight_in_and_out(full_graphs: dict[str, Any]) -> None:
    ffn = {(e["source"], e["target"]): e["weight"] for e in full_graphs["tiny"]["edges"]}
    for layer in range(N_LAYERS):
        for t in range(T):
            m = f"M{layer}_{t}"
            assert ffn[f"A{layer}_{t}", m] == ffn[m, f"I{layer}_{t}"]


# -- graph: routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
def test_route_matches_the_contract_and_is_renormalized(
    capsys: pytest.CaptureFixture[str], config_file: Path, model: str
) -> None:
    data = graph(capsys, config_file, "--model", model)
    check_structure(data)
    assert (data["threshold"], data["renormalize"], data["position"]) == (0.04, True, T - 1)
    assert all(edge["weight"] >= 0.04 for edge in data["edges"])
    sums = in_weight_sums(data)
    assert sums, "the route has no edges"
    for target, total in sums.items():
        assert total == pytest.approx(1.0, abs=1e-5), target
    # A route: every node on it leads to the output node.
    assert reaches_output(data) == {node["id"] for node in data["nodes"]}


def test_route_to_an_earlier_position(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    data = graph(capsys, config_file, "--position", "0", "--threshold", "0")
    check_structure(data)
    assert data["position"] == 0
    assert {node["token"] for node in data["nodes"]} == {0}  # causal: only token 0 feeds it
    back = graph(capsys, config_file, "--position", str(-T + 2))
    assert back["position"] == 2
    assert f"I{N_LAYERS - 1}_2" in {node["id"] for node in back["nodes"]}


def test_route_with_threshold_zero_but_renormalized_keeps_every_edge_to_the_output(
    capsys: pytest.CaptureFixture[str], config_file: Path, full_graphs: dict[str, Any]
) -> None:
    """τ = 0 prunes nothing, so the route to the last token is the full graph less what cannot
    reach it: the last layer's nodes at the other positions and the edges into them."""
    data = graph(capsys, config_file, "--threshold", "0")
    check_structure(data)
    top = N_LAYERS - 1
    unreachable = {f"{kind}{top}_{t}" for kind in "AMI" for t in range(T - 1)}
    full_edges = {(e["source"], e["target"], e["kind"]) for e in full_graphs["tiny"]["edges"]}
    route_edges = {(e["source"], e["target"], e["kind"]) for e in data["edges"]}
    assert route_edges == {e for e in full_edges if e[1] not in unreachable}
    assert len(route_edges) == len(data["edges"])


def test_heads_adds_per_head_weights_to_attention_edges_only(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    data = graph(capsys, config_file, "--heads", "--threshold", "0.02")
    check_structure(data)
    attention = [e for e in data["edges"] if e["kind"] == "attention"]
    assert attention
    for edge in attention:
        assert set(edge["heads"]) == {str(h) for h in range(N_HEADS)}
        assert all(type(v) is float and 0 <= v <= 1 + 1e-6 for v in edge["heads"].values())
    assert all("heads" not in e for e in data["edges"] if e["kind"] != "attention")
    plain = graph(capsys, config_file, "--threshold", "0.02")
    assert all("heads" not in e for e in plain["edges"])
    assert len(plain["edges"]) == len(data["edges"])


# -- graph: output formats -------------------------------------------------------------------------


def test_out_writes_the_json_to_a_file(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "graph.json"
    code, out, err = cli(
        capsys, "graph", "--config", str(config_file), "--prompt", PROMPT, "--out", str(target)
    )
    assert (code, out, err) == (0, "", "")
    assert json.loads(target.read_text()) == graph(capsys, config_file)


def test_graphml_has_the_same_nodes_and_edges_as_the_json(
    capsys: pytest.CaptureFixture[str], config_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "graph.graphml"
    args = ("--threshold", "0", "--no-renormalize")
    code, out, err = cli(
        capsys,
        "graph",
        "--config",
        str(config_file),
        "--prompt",
        PROMPT,
        *args,
        "--format",
        "graphml",
        "--out",
        str(target),
    )
    assert (code, out, err) == (0, "", "")
    data = graph(capsys, config_file, *args)
    g = nx.read_graphml(target)
    assert sorted(g.nodes) == sorted(node["id"] for node in data["nodes"])
    assert g.nodes[f"I{N_LAYERS - 1}_{T - 1}"]["kind"] == "after_layer"
    # The s = t attention edge and the residual edge join the same two nodes: both must survive.
    assert g.number_of_edges() == len(data["edges"])


# -- errors: exit 2, one line on stderr, nothing on stdout -----------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["info", "--model", "nope"], "'tiny'"),
        (["graph", "--prompt", ""], "empty"),
        (["graph", "--prompt", "  \n  "], "empty"),
        (["graph", "--prompt", "w1 w2", "--threshold", "1.5"], "threshold must be between 0 and 1"),
        (["graph", "--prompt", "w1 w2", "--threshold", "-0.1"], "threshold must be between 0"),
        (
            ["graph", "--prompt", "w1 w2", "--position", "3"],
            "position 3 is outside the prompt's 3 tokens",
        ),
        (["graph", "--prompt", "w1 w2", "--position", "-4"], "valid positions are 0..2"),
        (["graph", "--prompt", "w1 " * (MAX_CHARS // 3 + 1)], "max_user_string_length"),
        (["graph", "--prompt", prompt(128)], "129 tokens"),
        (["graph", "--prompt", "w1", "--out", "/nonexistent-dir/x.json"], "--out"),
        (["info", "--device", "tpu"], "cpu, cuda"),
        (["bench", "--tokens", "a,b"], "token counts must be comma-separated integers"),
        (["bench", "--tokens", "1"], "token counts must be at least 2"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], config_file: Path, argv: list[str], needle: str
) -> None:
    code, out, err = cli(capsys, argv[0], "--config", str(config_file), *argv[1:])
    assert needle in assert_one_error_line(code, out, err)


def test_cuda_without_cuda_is_one_error_line(
    capsys: pytest.CaptureFixture[str], config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = cli(
        capsys, "graph", "--config", str(config_file), "--prompt", "w1", "--device", "cuda"
    )
    assert "CUDA" in assert_one_error_line(code, out, err)


@pytest.mark.parametrize("content", [None, "{not json", '{"models": {}}', '{"modles": {}}'])
def test_bad_config_is_one_error_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    code, out, err = cli(capsys, "info", "--config", str(path))
    line = assert_one_error_line(code, out, err)
    assert "config.json" in line


def test_model_folder_without_weights_is_one_error_line(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, err = cli(capsys, "info", "--config", str(config_file), "--model", "empty")
    assert_one_error_line(code, out, err)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["graph"],
        ["graph", "--prompt", "w1", "--format", "xml"],
        ["graph", "--prompt", "w1", "--threshold", "abc"],
        ["graph", "--prompt", "w1", "--position", "last"],
        ["info", "--dtype", "float8"],
        ["info", "--bogus"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert_one_error_line(*cli(capsys, *argv))
