"""Models: load a configured model and expose its forward pass as a :class:`TransparentLlm`."""

from __future__ import annotations

from typing import Any

import torch

from llm_flow.config import ModelSpec
from llm_flow.errors import LlmFlowError
from llm_flow.models.base import LayerRun, ModelInfo, ModelRun, TransparentLlm
from llm_flow.models.bridge import BridgeLlm
from llm_flow.models.dispatch import check_devices
from llm_flow.models.loading import Progress, cache_dir, load_hf, resolve_device, resolve_dtype
from llm_flow.models.memory import keep_freed_memory
from llm_flow.models.random import byte_tokenizer, random_model, shape_config
from llm_flow.models.support import check_supported, unsupported
from llm_flow.placement import as_dict, device_map_arg

__all__ = [
    "BridgeLlm",
    "LayerRun",
    "ModelInfo",
    "ModelRun",
    "TransparentLlm",
    "load_model",
    "wrap_hf",
]


def wrap_hf(
    name: str,
    hf_model: Any,
    tokenizer: Any,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
    prepend_bos: bool | None = None,
) -> BridgeLlm:
    """A loaded Hugging Face causal LM and its tokenizer as a :class:`TransparentLlm`, its
    contributions computed on ``device`` (see :class:`BridgeLlm`); prompts longer than the
    model's ``max_position_embeddings`` are refused. A design llm-flow cannot decompose raises
    :class:`~llm_flow.errors.UnsupportedModelError`, never a traceback."""
    config = hf_model.config
    if not getattr(config, "architectures", None):
        # The bridge picks its adapter from it; models built from a config lack it.
        config.architectures = [type(hf_model).__name__]
    check_supported(config)
    keep_freed_memory()  # a pass's patterns reuse the last pass's memory, not fresh pages
    max_tokens = getattr(config, "max_position_embeddings", None)
    try:
        return BridgeLlm(
            name,
            hf_model,
            tokenizer,
            device=device,
            dtype=dtype,
            prepend_bos=prepend_bos,
            max_tokens=max_tokens,
        )
    except LlmFlowError:
        raise
    except Exception as exc:  # a layout no adapter or decomposition here understands
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise unsupported(config, f"a layout llm-flow could not take apart ({reason})") from exc


def load_model(
    spec: ModelSpec,
    *,
    device: str | None = None,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> BridgeLlm:
    """Load ``spec``'s weights and wrap them; device/dtype problems are reported before loading.

    ``device`` (default: the CPU) is where the model runs. With ``spec.device_map`` the model is
    split over the devices of the map, loaded in ``dtype``, and ``device`` (default: the device
    of the embedding) is where its contributions are computed.
    """
    torch_device = None if device is None else resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    check_devices(spec.device_map)
    if spec.source == "random":
        hf_model, tokenizer = _random(spec, torch_device, torch_dtype, progress)
    else:
        hf_model, tokenizer = load_hf(spec, dtype=torch_dtype, progress=progress)
    if progress is not None:
        progress("Wrapping the model in TransformerLens")
    return wrap_hf(
        spec.name,
        hf_model,
        tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        prepend_bos=spec.prepend_bos,
    )


def _random(
    spec: ModelSpec, device: torch.device | None, dtype: torch.dtype, progress: Progress | None
) -> tuple[Any, Any]:
    """A random-weight model of ``spec.shape``, built where it will run, and a byte tokenizer."""
    assert spec.shape is not None  # ModelSpec requires it for source "random"
    check_supported(shape_config(spec.shape))
    device = device or torch.device("cpu")
    where = device if spec.device_map is None else "the devices of its device map"
    if progress is not None:
        progress(f"Building random weights of shape {spec.shape} on {where}")
    model = random_model(
        spec.shape,
        device,
        dtype,
        device_map=device_map_arg(spec.device_map),
        max_memory=as_dict(spec.max_memory),
    )
    return model, byte_tokenizer(cache_dir() / "tokenizers" / "bytes")
