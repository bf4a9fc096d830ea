"""Designs llm-flow cannot decompose get one clear UnsupportedModelError — in the Python API,
when a folder is loaded, and in the CLI (one stderr line, exit 2) — never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

import llm_flow as lf
from llm_flow.config import ModelSpec
from llm_flow.errors import UnsupportedModelError
from llm_flow.models import load_model, wrap_hf
from llm_flow.models.support import TESTED_ARCHITECTURES, check_supported
from tests.cli_runner import run_cli
from tests.families import mamba_config
from tests.tiny import prompt, random_model, tiny_tokenizer

SMALL = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2}


def qwen3_next() -> tf.PretrainedConfig:
    return tf.Qwen3NextConfig(
        **SMALL,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["linear_attention", "full_attention"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=24,
    )


@pytest.mark.parametrize(
    ("config", "what"),
    [
        (mamba_config, "state-space"),
        (qwen3_next, "gated-delta-net"),
        (lambda: tf.JambaConfig(**SMALL), "Mamba"),
        (lambda: tf.T5Config(vocab_size=64, d_model=32), "an encoder and a decoder"),
        (lambda: tf.RwkvConfig(**SMALL), "RWKV"),
    ],
)
def test_unsupported_designs_name_the_architecture_and_what_is_missing(
    config: object, what: str
) -> None:
    with pytest.raises(UnsupportedModelError, match=what) as err:
        check_supported(config())  # type: ignore[operator]
    message = str(err.value)
    assert "\n" not in message and "supported families: " in message
    assert "Llama" in message and "Mixtral" in message


def test_supported_configs_pass() -> None:
    check_supported(tf.LlamaConfig())
    check_supported(tf.GptOssConfig())  # sliding and full attention layers


def test_wrapping_a_mamba_model_is_an_unsupported_model_error() -> None:
    model = random_model(mamba_config())
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM is not supported"):
        wrap_hf("mamba", model, tiny_tokenizer(), device="cpu", dtype=torch.float32)
    with pytest.raises(UnsupportedModelError, match="state-space"):
        lf.from_hf(model, tiny_tokenizer())


def test_a_layout_the_bridge_trips_on_is_an_error_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a new family's layout makes the wrapping raise (here the AttributeError MoE
    blocks once gave) reaches the user as the same one-line error, not a traceback."""
    import llm_flow.models as models

    def trip(*args: object, **kwargs: object) -> None:
        raise AttributeError("'MoEBridge' object has no attribute 'W_out'")

    monkeypatch.setattr(models.BridgeLlm, "__init__", trip)
    model = random_model(tf.LlamaConfig(**SMALL, intermediate_size=48, num_attention_heads=4))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*could not take apart"):
        wrap_hf("odd", model, tiny_tokenizer(), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def mamba_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mamba")
    random_model(mamba_config()).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_loading_an_unsupported_folder_fails_before_its_weights(mamba_folder: Path) -> None:
    spec = ModelSpec(name="mamba", source="local", path=mamba_folder)
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        load_model(spec)


def test_the_cli_prints_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str], mamba_folder: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    models = {"mamba": {"source": "local", "path": str(mamba_folder)}}
    config.write_text(json.dumps({"models": models}), encoding="utf-8")
    code, out, err = run_cli(capsys, "graph", "--config", str(config), "--prompt", prompt(3))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "MambaForCausalLM is not supported" in err and "Traceback" not in err


def test_the_tested_architectures_are_listed_in_the_message() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        check_supported(mamba_config())
    for name in TESTED_ARCHITECTURES:
        assert name.removesuffix("ForCausalLM") in str(err.value)


def test_experts_fed_pre_routed_tokens_are_refused_with_the_reason() -> None:
    """Llama 4's experts module receives tokens already scaled by their router weights, so
    the routing cannot be read from its call."""
    config = tf.Llama4TextConfig(
        **SMALL,
        intermediate_size=48,
        intermediate_size_mlp=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=1,
    )
    with pytest.raises(UnsupportedModelError, match="Llama4ForCausalLM is not supported.*routing"):
        wrap_hf("llama4", random_model(config), tiny_tokenizer(), device="cpu", dtype=torch.float32)
