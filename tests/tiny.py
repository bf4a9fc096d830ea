"""Tiny random-weight models of the core architecture families, built offline from transformers
configs (one model of every supported family: ``tests/families.py``).

Norm weights and biases are randomized too, so a decomposition that ignored a gain or a bias
would fail the tests instead of passing by accident (fresh HF norms are all ones, biases zeros).
"""

from __future__ import annotations

import functools
import tempfile

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from llm_flow.models.bridge import BridgeLlm

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 3)]

CONFIGS = {
    "llama-gqa": lambda: tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "gpt2-bias": lambda: tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "gemma3-postnorm": lambda: tf.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ),
    "neox-parallel": lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "qwen2-moe": lambda: tf.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ),
}
ARCHS = tuple(CONFIGS)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 … w60`` that prepends ``<bos>``, a fresh object per call.

    Loaded from disk because TransformerLens re-opens tokenizers by their path.
    """
    return AutoTokenizer.from_pretrained(_tokenizer_folder().name)


@functools.cache
def _tokenizer_folder() -> tempfile.TemporaryDirectory[str]:
    """The tokenizer saved once per process, in a folder removed at exit (one folder per call
    left ~950 behind in /tmp after a few suite runs)."""
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import processors

    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<eos>",
    )
    folder = tempfile.TemporaryDirectory(prefix="llm-flow-tok-")
    fast.save_pretrained(folder.name)
    return folder


def random_model(config: tf.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM of ``config`` whose norms, biases and attention sinks are
    randomized too (fresh HF norms are all ones, biases and sinks zeros)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("norm", "ln", "bias", "sinks")):
                param.add_(torch.randn_like(param) * 0.3)
    model.config.architectures = [type(model).__name__]
    return model


def tiny_hf_model(arch: str, seed: int = 0) -> torch.nn.Module:
    return random_model(CONFIGS[arch](), seed)


def tiny_llm(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> BridgeLlm:
    return BridgeLlm(arch, tiny_hf_model(arch, seed), tiny_tokenizer(), dtype=dtype)


def layer_split_map(model: torch.nn.Module, devices: list[int | str]) -> dict[str, int | str]:
    """A device map (module name → device) that splits the decoder layers evenly over
    ``devices``, in order, and puts everything else (embeddings, final norm, unembedding, rotary
    tables) on the first: tied embeddings stay together, and the last layer hands its output
    back across devices to the final norm."""
    n_layers = model.config.num_hidden_layers
    layers = next(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers
    )
    placed: dict[str, int | str] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for key, _ in tensors:
        if key.startswith(f"{layers}."):
            index = int(key[len(layers) + 1 :].split(".")[0])
            placed[f"{layers}.{index}"] = devices[index * len(devices) // n_layers]
        else:
            placed.setdefault(key.rsplit(".", 1)[0], devices[0])
    return placed


def prompt(n_tokens: int, seed: int = 0) -> str:
    """A prompt of exactly ``n_tokens`` words (``n_tokens + 1`` tokens with BOS)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_tokens,), generator=gen).tolist()
    return " ".join(WORDS[i] for i in idx)
