"""The Python API's models and SAEs (:mod:`llm_flow.api` re-exports the public names): loading
a configured model or wrapping a transformers one, remembering how :func:`load` loaded each model
(what Ray workers load again), and finding the SAE of a node as ``llm-flow latents`` does."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_flow.analyses.lens import parse_node
from llm_flow.config import ModelSpec, default_config, load_config
from llm_flow.errors import UnknownModelError
from llm_flow.models import TransparentLlm, load_model, wrap_hf
from llm_flow.models import sae as _sae
from llm_flow.models.dispatch import is_dispatched
from llm_flow.models.loading import Progress, resolve_device, resolve_dtype
from llm_flow.models.sae import Sae
from llm_flow.placement import parse_device_map, parse_max_memory

if TYPE_CHECKING:
    from llm_flow.engine.trace import Trace


def load(
    name: str | None = None,
    *,
    config: str | Path | None = None,
    device: str | None = None,
    dtype: str = "float32",
    device_map: str | Mapping[str, int | str] | None = None,
    max_memory: Mapping[str | int, int | str] | None = None,
    progress: Progress | None = None,
) -> TransparentLlm:
    """The model ``name`` of ``config`` (default: the repository's config/local.json and its
    default model, the packaged SmolLM2), on ``device`` (default: the CPU) in ``dtype``.
    ``progress(message)`` hears about slow steps (the first load of a packaged model dequantizes
    it, ~20 s).

    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"``, or module name → device, as
    transformers takes it) splits a model too large for one GPU over several, within
    ``max_memory`` (device → size such as ``"70GiB"``); it overrides the config entry's. The
    contributions are then computed on ``device``, by default the embedding's device."""
    cfg = default_config() if config is None else load_config(config)
    spec = cfg.model(cfg.default_model if name is None else name)
    if device_map is not None or max_memory is not None:
        spec = replace(
            spec,
            device_map=spec.device_map if device_map is None else parse_device_map(device_map),
            max_memory=spec.max_memory if max_memory is None else parse_max_memory(max_memory),
        )
    model = load_model(spec, device=device, dtype=dtype, progress=progress)
    LOADED_FROM[model] = (spec, device, dtype)
    return model


# How lf.load loaded each model still alive: what Ray workers load again (build_index(ray=…)).
LOADED_FROM: weakref.WeakKeyDictionary[TransparentLlm, tuple[ModelSpec, str | None, str]] = (
    weakref.WeakKeyDictionary()
)


def from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    name: str | None = None,
    prepend_bos: bool | None = None,
) -> TransparentLlm:
    """Any already-loaded transformers causal LM (on its own device and dtype, or dispatched
    over several with a ``device_map``: contributions are then computed on the embedding's
    device) and its tokenizer. ``prepend_bos=None`` follows the tokenizer (see
    ``config/local.json``)."""
    first = next(hf_model.parameters())
    # A model loaded from a folder is named by the folder, not by a full server path.
    source = Path(str(getattr(hf_model.config, "name_or_path", "") or "")).name
    label = name or source or type(hf_model).__name__
    device = None if is_dispatched(hf_model) else resolve_device(str(first.device))
    dtype = resolve_dtype(str(first.dtype).removeprefix("torch."))
    return wrap_hf(label, hf_model, tokenizer, device=device, dtype=dtype, prepend_bos=prepend_bos)


def load_sae(path_or_repo: str | Path, hook: str | None = None) -> Sae:
    """An SAE from a SAELens folder, a Gemma Scope ``params.npz`` or a hub repository
    ``owner/name[/folder]`` (``hook`` names the hook for files that do not)."""
    return _sae.load_sae(path_or_repo, hook)


def node_sae(tr: Trace, node: str, sae: Sae | str | Path | None) -> Sae:
    """``sae`` as given (loaded if a path), else the default config's SAE for the node's hook
    (when the model is configured there) or the one ``llm-flow sae train`` left in the cache."""
    parse_node(node, tr.n_layers, tr.n_tokens)
    return model_sae(tr.llm, node, sae)


def model_sae(
    model: TransparentLlm, node: str, sae: Sae | str | Path | None, hook: str | None = None
) -> Sae:
    """:func:`node_sae` for a model (``hook`` names the hook of files that do not)."""
    if isinstance(sae, Sae):
        return sae
    if sae is not None:
        return _sae.load_sae(sae, hook)
    parsed = parse_node(node, model.info.n_layers)
    configured: tuple[tuple[str, str], ...] = ()
    with suppress(UnknownModelError):
        configured = default_config().model(model.info.name).saes
    return _sae.find_sae(configured, model.info.name, parsed.kind, parsed.layer)
