"""One tiny random-weight model per supported decoder family: the test matrix of
``tests/unit/models/test_families.py`` and the source of the README's "Supported models" table
(``scripts/supported_models.py`` writes it; a test fails when it is stale).

Every model is built offline from its transformers config (2 layers, width 32, a 64-word
vocabulary) with norms and biases randomized (see :func:`tests.tiny.randomize`), so a
decomposition that ignored a gain, a bias or a multiplier fails instead of passing by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import transformers as tf

from tests.tiny import VOCAB

_BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
_MOE = {"num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2}
_MULTIPLIERS = {
    "embedding_multiplier": 3.0,
    "residual_multiplier": 0.5,
    "attention_multiplier": 0.3,
    "logits_scaling": 2.0,
}
_MLA = {
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}


@dataclass(frozen=True)
class Family:
    """A decoder family: its display name, what is special about it, and its tiny config."""

    name: str
    special: str
    config: Callable[[], Any]
    experts: bool = False  # a mixture of experts


def _cfg(cls: type, *, mha: bool = False, **overrides: Any) -> Callable[[], Any]:
    """``cls`` over the shared tiny sizes; ``mha`` for families without grouped-query heads
    (their configs would keep an unused ``num_key_value_heads`` that TransformerLens reads)."""
    base = {k: v for k, v in _BASE.items() if not (mha and k == "num_key_value_heads")}
    return lambda: cls(**(base | overrides))


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family(
            "GLM-4-MoE",
            "shared experts, a dense first layer",
            _cfg(
                tf.Glm4MoeConfig,
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=1,
                topk_group=1,
                head_dim=8,
            ),
            experts=True,
        ),
        Family(
            "ERNIE 4.5 MoE",
            "experts plus shared experts",
            _cfg(
                tf.Ernie4_5_MoeConfig,
                moe_num_experts=4,
                moe_k=2,
                moe_intermediate_size=24,
                moe_num_shared_experts=1,
                moe_layer_start_index=0,
            ),
            experts=True,
        ),
        Family(
            "MiniMax-M2",
            "experts, sigmoid routing",
            _cfg(tf.MiniMaxM2Config, **_MOE, head_dim=8),
            experts=True,
        ),
        Family(
            "Llama 3",
            "grouped-query attention, llama3 rope scaling",
            _cfg(
                tf.LlamaConfig,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            ),
        ),
        Family("Mistral", "sliding-window attention", _cfg(tf.MistralConfig, sliding_window=4)),
        Family("Qwen2", "q/k/v biases", _cfg(tf.Qwen2Config)),
        Family("Qwen3", "q/k norms", _cfg(tf.Qwen3Config, head_dim=8)),
        Family(
            "Gemma 2",
            "post-norms, logit and attention softcapping",
            _cfg(tf.Gemma2Config, head_dim=8, sliding_window=4),
        ),
        Family(
            "Gemma 3",
            "post-norms, local/global layers",
            _cfg(tf.Gemma3TextConfig, head_dim=8, sliding_window=4),
        ),
        Family("Phi-3", "fused q/k/v and gate/up", _cfg(tf.Phi3Config)),
        Family(
            "Phi",
            "parallel attention + FFN, partial rotary",
            _cfg(tf.PhiConfig, partial_rotary_factor=0.5),
        ),
        Family(
            "GPT-NeoX",
            "parallel residual",
            _cfg(tf.GPTNeoXConfig, mha=True, use_parallel_residual=True),
        ),
        Family(
            "GPT-J",
            "parallel blocks, rotary on part of the head",
            _cfg(tf.GPTJConfig, rotary_dim=4),
        ),
        Family("GPT-2", "learned positions, biases everywhere", _cfg(tf.GPT2Config, mha=True)),
        Family(
            "OPT", "learned positions, ReLU", _cfg(tf.OPTConfig, ffn_dim=48, word_embed_proj_dim=32)
        ),
        Family(
            "Falcon",
            "parallel attention, multi-query",
            _cfg(tf.FalconConfig, new_decoder_architecture=False, multi_query=True),
        ),
        Family(
            "StableLM",
            "partial rotary, LayerNorm",
            _cfg(tf.StableLmConfig, partial_rotary_factor=0.25),
        ),
        Family("OLMo", "LayerNorm without parameters", _cfg(tf.OlmoConfig)),
        Family("OLMo 2", "post-norms, q/k norms", _cfg(tf.Olmo2Config)),
        Family("OLMo 3", "post-norms, sliding windows", _cfg(tf.Olmo3Config, sliding_window=4)),
        Family("Cohere", "parallel blocks, logit scale", _cfg(tf.CohereConfig, logit_scale=0.5)),
        Family("GPT-BigCode", "multi-query attention", _cfg(tf.GPTBigCodeConfig, multi_query=True)),
        Family("Bloom", "ALiBi positions", _cfg(tf.BloomConfig)),
        Family(
            "MPT",
            "ALiBi, no biases",
            _cfg(tf.MptConfig, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2),
        ),
        Family(
            "SmolLM3",
            "layers without positions (NoPE)",
            _cfg(tf.SmolLM3Config, no_rope_layer_interval=2),
        ),
        Family("Starcoder2", "biases, sliding window", _cfg(tf.Starcoder2Config, sliding_window=4)),
        Family("GLM-4", "post-norms, partial rotary", _cfg(tf.Glm4Config, head_dim=8)),
        Family("EXAONE 4", "post-norms, q/k norms", _cfg(tf.Exaone4Config, sliding_window=4)),
        Family(
            "Gemma", "Gemma's (1 + w) norms, scaled embeddings", _cfg(tf.GemmaConfig, head_dim=8)
        ),
        Family(
            "Cohere 2", "parallel blocks, sliding windows", _cfg(tf.Cohere2Config, sliding_window=4)
        ),
        Family("Seed-OSS", "q/k/v biases", _cfg(tf.SeedOssConfig, head_dim=8)),
        Family("HunYuan", "q/k norms after rotary", _cfg(tf.HunYuanDenseV1Config, head_dim=8)),
        Family("Apertus", "xIELU activation, q/k norms", _cfg(tf.ApertusConfig)),
        Family(
            "Granite",
            "embedding, residual, attention and logit multipliers",
            _cfg(tf.GraniteConfig, **_MULTIPLIERS),
        ),
        Family("Mixtral", "mixture of experts", _cfg(tf.MixtralConfig, **_MOE), experts=True),
        Family(
            "Qwen2-MoE",
            "experts plus a gated shared expert",
            _cfg(
                tf.Qwen2MoeConfig,
                **_MOE,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=40,
            ),
            experts=True,
        ),
        Family(
            "Qwen3-MoE",
            "experts, q/k norms",
            _cfg(tf.Qwen3MoeConfig, **_MOE, moe_intermediate_size=24, head_dim=8),
            experts=True,
        ),
        Family(
            "OLMoE",
            "64 small experts (here 4), q/k norms",
            _cfg(tf.OlmoeConfig, **_MOE),
            experts=True,
        ),
        Family(
            "GPT-OSS",
            "experts with biases and clamped SwiGLU, attention sinks",
            _cfg(
                tf.GptOssConfig,
                **_MOE,
                head_dim=8,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
            ),
            experts=True,
        ),
        Family(
            "Granite MoE",
            "experts and multipliers",
            _cfg(tf.GraniteMoeConfig, **_MOE, **_MULTIPLIERS),
            experts=True,
        ),
        Family(
            "DeepSeek-V2",
            "multi-head latent attention, shared experts",
            _cfg(tf.DeepseekV2Config, **_MLA, q_lora_rank=None),
            experts=True,
        ),
        Family(
            "DeepSeek-V3",
            "latent attention, shared experts, a dense first layer",
            _cfg(tf.DeepseekV3Config, **_MLA, q_lora_rank=12),
            experts=True,
        ),
    ]
}


def mamba_config() -> Any:
    """A tiny Mamba: the unsupported design the error tests load (state-space layers)."""
    return tf.MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=4,
        bos_token_id=0,
        eos_token_id=1,
    )
