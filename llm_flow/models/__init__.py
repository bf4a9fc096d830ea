"""Models: load a configured model and expose its forward pass as a :class:`TransparentLlm`."""

from __future__ import annotations

from llm_flow.config import ModelSpec
from llm_flow.models.base import LayerRun, ModelInfo, ModelRun, TransparentLlm
from llm_flow.models.bridge import BridgeLlm
from llm_flow.models.loading import Progress, load_hf, resolve_device, resolve_dtype

__all__ = [
    "BridgeLlm",
    "LayerRun",
    "ModelInfo",
    "ModelRun",
    "TransparentLlm",
    "load_model",
]


def load_model(
    spec: ModelSpec,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    progress: Progress | None = None,
) -> BridgeLlm:
    """Load ``spec``'s weights and wrap them; device/dtype problems are reported before loading."""
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    hf_model, tokenizer = load_hf(spec, progress=progress)
    if progress is not None:
        progress("Wrapping the model in TransformerLens")
    max_tokens = getattr(hf_model.config, "max_position_embeddings", None)
    return BridgeLlm(
        spec.name,
        hf_model,
        tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        prepend_bos=spec.prepend_bos,
        max_tokens=max_tokens,
    )
