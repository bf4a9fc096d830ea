"""Random-weight models of real shapes, offline: benchmark any device with no download.

A shape is a Hugging Face ``config.json`` shipped under ``config/shapes/`` (``Llama-3.1-8B``,
``Qwen2.5-7B``, ``Gemma-2-9B``, ``Mixtral-8x7B``, ``Qwen3-30B-A3B``, ``Llama-3.1-70B``,
``Qwen2.5-0.5B``) or any config.json path. The model is built directly on the target device in
the target dtype (never materialized on the CPU first) with transformers' own initialization
from a fixed seed, and paired with a byte-level tokenizer (one token per UTF-8 byte, plus a
BOS), whose ids are valid in every vocabulary. With a device map the model is built on the meta
device and each module is allocated and initialized on the device it is mapped to (see
:mod:`llm_flow.models.dispatch`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llm_flow import resources
from llm_flow.errors import ModelLoadError
from llm_flow.models.dispatch import check_fits, dispatch, infer_device_map, materialize
from llm_flow.placement import Device

SHAPES_DIR = resources.shapes_dir()
SEED = 0
_BOS = "<bos>"


def shape_names() -> tuple[str, ...]:
    """The shipped shapes, sorted."""
    return tuple(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))


def shape_config(shape: str) -> Any:
    """The transformers config of a shipped shape name or of a config.json path."""
    from transformers import AutoConfig

    path = SHAPES_DIR / f"{shape}.json"
    if not path.is_file():
        path = Path(shape).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"unknown shape {shape!r}; shipped shapes are {', '.join(shape_names())} "
            "(or give the path of a config.json)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        model_type = raw.pop("model_type")
        config = AutoConfig.for_model(model_type, **raw)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"shape {shape!r} ({path}) is not a usable config.json: {exc}"
        ) from exc
    if not getattr(config, "architectures", None):
        raise ModelLoadError(f"shape {shape!r} ({path}) names no 'architectures'")
    return config


def byte_tokenizer(folder: Path) -> Any:
    """A tokenizer with one token per UTF-8 byte (ids 0–255) and ``<bos>`` (256) put first.

    Saved in ``folder`` and reloaded: TransformerLens re-opens tokenizers by their path.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").exists():
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {char: i for i, char in enumerate(sorted(alphabet))}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        core.decoder = decoders.ByteLevel()
        core.add_special_tokens([_BOS])
        core.post_processor = processors.TemplateProcessing(
            single=f"{_BOS} $A", special_tokens=[(_BOS, len(vocab))]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=_BOS)
        folder.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def random_model(
    shape: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    device_map: str | dict[str, Device] | None = None,
    max_memory: dict[Device, int | str] | None = None,
) -> Any:
    """A random-weight causal LM of ``shape``, built on ``device`` in ``dtype`` — or, with a
    ``device_map``, split over the devices it names (within ``max_memory``)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    torch.manual_seed(SEED)
    if device_map is not None:
        return _dispatched(config, dtype, device_map, max_memory)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"shape {shape!r} does not fit on {device} in {str(dtype).removeprefix('torch.')}; "
            "choose a smaller shape or dtype, or another device"
        ) from exc
    return model.eval()


def _dispatched(
    config: Any,
    dtype: torch.dtype,
    device_map: str | dict[str, Device],
    max_memory: dict[Device, int | str] | None,
) -> Any:
    """Build on the meta device (no memory), place the modules as accelerate would, then
    allocate and initialize each module's weights on its own device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on meta; the small buffers (rotary) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    placement = infer_device_map(model, device_map, max_memory)
    check_fits(placement)
    materialize(model, placement)
    for module in model.modules():
        # transformers marks modules built under init_empty_weights as initialized; their
        # storage holds whatever was in memory until initialize_weights runs.
        module.__dict__.pop("_is_hf_initialized", None)
    with torch.no_grad():
        model.initialize_weights()  # transformers' own init, run where each weight lives
    model.tie_weights()
    return dispatch(model, placement).eval()
