"""Which models llm-flow can decompose, and one clear error for those it cannot.

A decoder llm-flow supports writes every layer's update as attention over tokens plus an FFN
(dense, or a mixture of experts). State-space and linear-attention layers (Mamba, RWKV, the
hybrids Jamba, Zamba, Qwen3-Next, …) mix tokens through a recurrent state, not a softmax over
sources, so there is no per-token part to score; encoder-decoders have two streams. Those raise
:class:`~llm_flow.errors.UnsupportedModelError` before anything is wrapped.
"""

from __future__ import annotations

from typing import Any

from llm_flow.errors import UnsupportedModelError

# The Hugging Face classes of the families tested (tests/families.py builds one tiny model per
# family; a test keeps this tuple and that matrix equal).
TESTED_ARCHITECTURES = (
    "ApertusForCausalLM",
    "BloomForCausalLM",
    "Cohere2ForCausalLM",
    "CohereForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "Ernie4_5_MoeForCausalLM",
    "Exaone4ForCausalLM",
    "FalconForCausalLM",
    "GPT2LMHeadModel",
    "GPTBigCodeForCausalLM",
    "GPTJForCausalLM",
    "GPTNeoXForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GemmaForCausalLM",
    "Glm4ForCausalLM",
    "Glm4MoeForCausalLM",
    "GptOssForCausalLM",
    "GraniteForCausalLM",
    "GraniteMoeForCausalLM",
    "HunYuanDenseV1ForCausalLM",
    "LlamaForCausalLM",
    "MiniMaxM2ForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "MptForCausalLM",
    "OPTForCausalLM",
    "Olmo2ForCausalLM",
    "Olmo3ForCausalLM",
    "OlmoForCausalLM",
    "OlmoeForCausalLM",
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "SeedOssForCausalLM",
    "SmolLM3ForCausalLM",
    "StableLmForCausalLM",
    "Starcoder2ForCausalLM",
)
# Layer kinds that mix tokens through a softmax over sources (HF configs' ``layer_types``).
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
# Layers without a softmax over sources, by model type, for configs that list no layer_types.
_RECURRENT = {
    "mamba": "state-space (Mamba) layers",
    "mamba2": "state-space (Mamba-2) layers",
    "falcon_mamba": "state-space (Mamba) layers",
    "falcon_h1": "hybrid attention + Mamba layers",
    "jamba": "hybrid attention + Mamba layers",
    "bamba": "hybrid attention + Mamba layers",
    "zamba": "hybrid attention + Mamba layers",
    "zamba2": "hybrid attention + Mamba layers",
    "nemotron_h": "hybrid attention + Mamba layers",
    "granitemoehybrid": "hybrid attention + Mamba layers",
    "rwkv": "RWKV (linear attention) layers",
    "rwkv7": "RWKV (linear attention) layers",
    "recurrent_gemma": "recurrent (RG-LRU) layers",
    "lfm2": "short-convolution layers",
    "lfm2_moe": "short-convolution layers",
    "qwen3_next": "hybrid gated-delta-net (linear attention) layers",
    "olmo_hybrid": "hybrid linear-attention layers",
}


def supported_families() -> str:
    """The tested architectures, for error messages."""
    return ", ".join(name.removesuffix("ForCausalLM") for name in TESTED_ARCHITECTURES)


def _architecture(config: Any) -> str:
    names = getattr(config, "architectures", None) or []
    return str(names[0]) if names else str(getattr(config, "model_type", "unknown"))


def unsupported(config: Any, what: str) -> UnsupportedModelError:
    """The error for a model whose ``what`` llm-flow cannot write as a sum of parts."""
    return UnsupportedModelError(
        f"{_architecture(config)} is not supported: it has {what}, which llm-flow cannot "
        f"decompose into per-token parts; supported families: {supported_families()}"
    )


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` for a design with no per-token decomposition."""
    if getattr(config, "is_encoder_decoder", False):
        raise unsupported(config, "an encoder and a decoder (two residual streams)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text, "model_type", ""))
    if model_type in _RECURRENT:
        raise unsupported(config, _RECURRENT[model_type])
    kinds = set(getattr(text, "layer_types", None) or ()) - _ATTENTION_LAYERS
    if kinds:
        raise unsupported(config, f"{', '.join(sorted(kinds))} layers")
