"""Models split over devices (llm_flow/placement.py, llm_flow/models/dispatch.py): config values
are checked with clear errors, a dispatched model gives the plain model's graph, random-weight
shapes are built on meta and materialized module by module, maps over several (fake) GPUs come
out as accelerate computes them, and every captured tensor lands on the contribution device.

The splits here put every module on "cpu" (through accelerate's hooks all the same), so they run
anywhere; tests/unit/engine/test_cuda.py runs a real two-GPU split where there are two GPUs.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model, init_empty_weights
from transformers import AutoModelForCausalLM

import llm_flow as lf
from llm_flow.config import ModelSpec, load_config
from llm_flow.engine.graph import FlowGraph
from llm_flow.engine.trace import trace
from llm_flow.errors import ConfigError, DeviceError, ModelLoadError
from llm_flow.models import BridgeLlm, load_model
from llm_flow.models.dispatch import check_fits, infer_device_map
from llm_flow.models.random import random_model, shape_config
from llm_flow.placement import parse_device_map, parse_max_memory
from tests.cli_runner import run_cli
from tests.conftest import SavedTiny, f32_tol
from tests.tiny import layer_split_map, prompt, tiny_hf_model, tiny_tokenizer
from tests.unit.models.conftest import ShapeFile

TEXT = prompt(10, seed=3)


@pytest.fixture
def tiny_shape(shape_file: ShapeFile) -> Path:
    return shape_file(4)


# Dispatch hooks move activations between modules, which can change a matmul's memory layout
# and so its summation order: with one thread, weights then differed by 6.5e-9 (measured). The
# bound is float32 rounding through three small layers (a few hundred roundings of values of
# size ~1), as the family tests use: 4.6e-5.
SAME_GRAPH_ATOL = f32_tol(terms=3 * 128)


def assert_same_graph(got: FlowGraph, want: FlowGraph) -> None:
    tol = {"atol": SAME_GRAPH_ATOL, "rtol": 0}
    torch.testing.assert_close(got.dense_attention(), want.dense_attention(), **tol)
    for field in ("attn_residual", "attn_bias", "ffn"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), **tol)


# -- config values -----------------------------------------------------------------------------


def test_device_maps_and_budgets_are_kept_hashable() -> None:
    spec = ModelSpec(
        name="m",
        source="hub",
        device_map={"model.embed_tokens": 0, "model.layers.0": "cuda:1", "lm_head": 1},
        max_memory={"0": "70GiB", "cuda:1": 10**9, "cpu": "100GB"},
    )
    assert spec.device_map == (
        ("model.embed_tokens", 0),
        ("model.layers.0", "cuda:1"),
        ("lm_head", 1),
    )
    assert spec.max_memory == ((0, "70GiB"), (1, 10**9), ("cpu", "100GB"))
    hash(spec)  # part of the app's cache key
    assert ModelSpec(name="m", source="hub", device_map="auto").device_map == "auto"


def test_a_config_entry_reads_device_map_and_max_memory(tmp_path: Path) -> None:
    entry = {
        "source": "random",
        "shape": "Llama-3.1-70B",
        "device_map": "auto",
        "max_memory": {"0": "70GiB", "1": "70GiB"},
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"models": {"big": entry}}), encoding="utf-8")
    spec = load_config(path).model("big")
    assert (spec.device_map, spec.max_memory) == ("auto", ((0, "70GiB"), (1, "70GiB")))


@pytest.mark.parametrize(
    ("device_map", "max_memory", "message"),
    [
        ("everywhere", None, "unknown strategy 'everywhere'; valid strategies are 'auto'"),
        ({}, None, "non-empty object mapping module names to devices"),
        (["model"], None, "expected one of 'auto'"),
        ({"model.layers.0": "disk"}, None, "'disk' offloads weights"),
        ({"model.layers.0": "meta"}, None, "'meta' offloads weights"),
        ({"model.layers.0": "tpu"}, None, "unknown device 'tpu'; use a GPU index"),
        ({"model.layers.0": -1}, None, "unknown device -1"),
        ({"model.layers.0": True}, None, "unknown device True"),
        ({"a": 0, "b": "cpu"}, None, "mixes 'cpu' with GPUs"),
        (None, {"0": "70GiB"}, "'max_memory' only applies with a 'device_map'"),
        ("auto", {"0": "lots"}, "expected a size like '70GiB'"),
        ("auto", {"0": 0}, "expected a size like '70GiB'"),
        ("auto", {"gpu": "1GB"}, "unknown device 'gpu'"),
        ("auto", {"disk": "1GB"}, "unknown device 'disk'"),
        ("auto", [], "expected an object mapping devices to sizes"),
    ],
)
def test_bad_placements_say_what_is_valid(
    device_map: object, max_memory: object, message: str, tmp_path: Path
) -> None:
    entry = {"source": "hub", "device_map": device_map, "max_memory": max_memory}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"models": {"gpt2": entry}}), encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(path)
    assert str(path) in str(err.value) and "'gpt2'" in str(err.value)


def test_parsing_is_idempotent() -> None:
    once = parse_device_map({"model": "cpu"})
    assert parse_device_map(once) == once
    budget = parse_max_memory({"cuda:0": "1GB"})
    assert parse_max_memory(budget) == budget == ((0, "1GB"),)


def test_a_map_naming_a_missing_gpu_is_refused_before_loading(tiny_shape: Path) -> None:
    spec = ModelSpec(name="t", source="random", shape=str(tiny_shape), device_map={"": 99})
    with pytest.raises(DeviceError, match="puts the model on cuda:99, but this machine has"):
        load_model(spec)


def test_the_cli_takes_a_device_map(capsys: pytest.CaptureFixture[str], tiny_shape: Path) -> None:
    model = f"random:{tiny_shape}"
    code, out, _ = run_cli(capsys, "info", "--model", model, "--device-map", '{"": "cpu"}')
    assert code == 0 and json.loads(out)["weight_devices"] == ["cpu"]
    code, _, err = run_cli(capsys, "info", "--model", model, "--device-map", '{"": cpu}')
    assert code == 2 and err.count("\n") == 1 and "--device-map is not valid JSON" in err
    code, _, err = run_cli(capsys, "info", "--model", model, "--device-map", "spread")
    assert code == 2 and "--device-map: unknown strategy 'spread'" in err


# -- dispatched models give the plain model's graph ------------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-postnorm", "qwen2-moe"])
def test_an_accelerate_hooked_model_gives_the_plain_graph(arch: str) -> None:
    """accelerate's AlignDevicesHook on every layer (force_hooks: a split over "cpu" alone
    would otherwise be a plain .to()) and TransformerLens's hooks work together."""
    plain = trace(BridgeLlm(arch, tiny_hf_model(arch), tiny_tokenizer()), TEXT).graph
    model = tiny_hf_model(arch)
    model = dispatch_model(
        model, device_map=layer_split_map(model, ["cpu", "cpu"]), force_hooks=True
    )
    llm = lf.from_hf(model, tiny_tokenizer(), name=arch)
    assert (llm.info.device, llm.info.weight_devices) == ("cpu", ("cpu",))
    assert_same_graph(lf.trace(llm, TEXT).graph, plain)


def test_a_folder_loaded_with_a_device_map_gives_the_plain_graph(saved_tiny: SavedTiny) -> None:
    folder = saved_tiny("llama-gqa")
    plain = trace(load_model(ModelSpec(name="t", source="local", path=folder)), TEXT).graph
    placed = layer_split_map(tiny_hf_model("llama-gqa"), ["cpu", "cpu"])
    spec = ModelSpec(name="t", source="local", path=folder, device_map=placed)
    llm = load_model(spec)
    assert llm.info.device == "cpu"
    assert_same_graph(trace(llm, TEXT).graph, plain)


def test_lf_load_takes_a_device_map(saved_tiny: SavedTiny, tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"models": {"t": str(saved_tiny("gpt2-bias"))}}), encoding="utf-8")
    plain = lf.trace(lf.load("t", config=config), TEXT).graph
    llm = lf.load("t", config=config, device_map="auto", max_memory={"cpu": "1GB"})
    assert llm.info.weight_devices == ("cpu",)
    assert_same_graph(lf.trace(llm, TEXT).graph, plain)
    with pytest.raises(ConfigError, match="unknown strategy"):
        lf.load("t", config=config, device_map="spread")


def test_a_dispatched_model_keeps_its_dtype(saved_tiny: SavedTiny) -> None:
    spec = ModelSpec(name="t", source="local", path=saved_tiny("llama-gqa"), device_map="auto")
    llm = load_model(spec, dtype="bfloat16")  # loaded in bfloat16, not cast afterwards
    assert llm.info.dtype == "bfloat16"
    assert llm.run(TEXT).layers[0].resid_post.dtype == torch.bfloat16
    model = tiny_hf_model("llama-gqa")
    model = dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
    with pytest.raises(DeviceError, match="split over devices in float32, but bfloat16"):
        BridgeLlm("t", model, tiny_tokenizer(), dtype=torch.bfloat16)


def test_offloaded_weights_are_refused_in_words() -> None:
    """accelerate can offload to disk, but then the modules hold meta placeholders outside the
    forward pass, where llm-flow (and TransformerLens's W_O) read weights."""
    model = tiny_hf_model("llama-gqa")
    placed = layer_split_map(model, ["cpu", "cpu", "disk"])
    with tempfile.TemporaryDirectory() as offload:
        model = dispatch_model(model, device_map=placed, offload_dir=offload)
        with pytest.raises(ModelLoadError, match=r"offloads weights \(model.layers.2 \(disk\)\)"):
            BridgeLlm("t", model, tiny_tokenizer())


# -- random-weight shapes: built on meta, materialized per module ------------------------------


def test_a_random_shape_is_materialized_module_by_module(
    tiny_shape: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = shape_config(str(tiny_shape))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    placed = layer_split_map(skeleton, ["cpu", "cpu"])
    allocated: list[tuple[str, str]] = []
    to_empty = torch.nn.Module.to_empty

    def spy(module: torch.nn.Module, *, device: torch.device, recurse: bool = True) -> object:
        # Every module materialized had only meta weights: nothing was allocated before.
        assert all(p.is_meta for p in module.parameters())
        allocated.append((type(module).__name__, str(device)))
        return to_empty(module, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    model = random_model(str(tiny_shape), torch.device("cpu"), torch.float32, device_map=placed)
    assert len(allocated) == len(placed) and {d for _, d in allocated} == {"cpu"}
    assert allocated.count(("LlamaDecoderLayer", "cpu")) == 4
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert model.hf_device_map == placed
    # transformers' initialization ran on every weight (fresh storage is arbitrary bytes).
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param))
        else:
            assert 0.01 < float(param.detach().std()) < 0.03, name  # initializer_range 0.02
    plain = random_model(str(tiny_shape), torch.device("cpu"), torch.float32)
    for (name, got), (_, want) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(got, want, msg=name)  # rotary tables


def test_a_random_shape_with_a_device_map_runs_self_checked(
    tiny_shape: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name="t", source="random", shape=str(tiny_shape), device_map="sequential")
    run = load_model(spec).run("héllo")  # every self-check runs on every layer
    again = load_model(spec).run("héllo")
    assert torch.equal(run.logits, again.logits)  # a fixed seed: the same weights every time


@pytest.mark.parametrize("strategy", ["sequential", "balanced"])
def test_maps_over_several_gpus_keep_layers_whole(tiny_shape: Path, strategy: str) -> None:
    """Fake budgets for GPUs this machine does not have: accelerate computes the map all the
    same (it only warns that the devices are absent)."""
    config = shape_config(str(tiny_shape))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() * 4 for p in model.parameters())  # float32
    placed = infer_device_map(model, strategy, {0: int(0.75 * size), 1: int(0.75 * size)})
    assert placed["model.embed_tokens"] == 0
    layers = [placed[f"model.layers.{i}"] for i in range(4)]
    assert layers == sorted(layers) and set(layers) == {0, 1}  # in order, over both GPUs
    assert set(placed.values()) == {0, 1}
    short = infer_device_map(model, strategy, {0: int(0.3 * size), 1: int(0.3 * size)})
    assert "disk" in short.values()  # what does not fit is offloaded …
    with pytest.raises(ModelLoadError, match="does not fit in the devices' memory"):
        check_fits(short)  # … which llm-flow refuses before allocating anything
    assert all(name.count(".") <= 2 for name in placed)  # no layer is cut in two


def test_llama_70b_in_bfloat16_spreads_over_four_80gb_gpus() -> None:
    """The README's arithmetic: ~141 GB of weights. Two 80 GB cards hold them with ~9 GB each
    to spare (too little for the activations a run captures); four hold ~35 GB each."""
    config = shape_config("Llama-3.1-70B")
    with init_empty_weights():  # no memory: every weight on meta
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    size = sum(p.numel() * 2 for p in model.parameters())
    assert 140e9 < size < 142e9
    four = infer_device_map(model, "auto", {**{i: "80GB" for i in range(4)}, "cpu": "200GB"})
    assert set(four.values()) == {0, 1, 2, 3}
    assert all(list(four.values()).count(gpu) >= 18 for gpu in range(4))  # of 80 layers
    two = infer_device_map(model, "auto", {0: "80GB", 1: "80GB", "cpu": "200GB"})
    assert set(two.values()) == {0, 1}
    assert 2 * 80e9 - size < 20e9


# -- captured tensors move to the contribution device ---------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-moe"])
def test_every_capture_lands_on_the_contribution_device(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose weights are on the CPU, with its contributions asked for on "meta": every
    activation of the run must arrive there (a capture point that forgot to move its tensor
    would leave it on the CPU), while the weights stay where the layer is. Meta tensors have no
    values, so the self-checks are off for this one run."""
    monkeypatch.setattr("llm_flow.models.bridge.check_layer", lambda layer: None)
    model = tiny_hf_model(arch)
    model = dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
    llm = BridgeLlm(arch, model, tiny_tokenizer(), device="meta")
    assert llm.info.device == "meta" and llm.info.weight_devices == ("cpu",)
    run = llm.run(TEXT)
    assert run.logits.is_meta and run.final_scale.is_meta and llm.W_U.is_meta
    for layer in run.layers:
        # An MoE layer's W_out is an empty placeholder (its weights are the experts').
        weights = {"W_O"} if layer.experts is not None else {"W_O", "W_out"}
        for field in layer.__dataclass_fields__:
            value = getattr(layer, field)
            if isinstance(value, torch.Tensor):
                assert value.is_meta != (field in weights), (layer.index, field)
        if layer.experts is not None:
            ex = layer.experts
            assert all(t.is_meta for t in (ex.index, ex.weight, ex.acts, ex.b_out))
            assert ex.shared_acts is not None and ex.shared_acts.is_meta
            assert ex.shared_b_out is not None and ex.shared_b_out.is_meta
            assert ex.W_out.device.type == "cpu"
            assert ex.shared_W_out is not None and ex.shared_W_out.device.type == "cpu"
    assert arch != "qwen2-moe" or any(layer.experts is not None for layer in run.layers)
