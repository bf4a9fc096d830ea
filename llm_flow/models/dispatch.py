"""Models split over several devices: accelerate's big-model dispatch (transformers'
``device_map``), and the one device llm-flow computes on.

A model larger than one GPU is loaded with ``from_pretrained(device_map=…, max_memory=…)``:
accelerate gives each decoder layer (a ``_no_split_modules`` class, never cut in two) a device
and hooks the modules (``AlignDevicesHook``) so activations follow the weights. A random-weight
shape is built on the meta device, placed by the same computation (:func:`infer_device_map`), and
each module is materialized on its own device (:func:`materialize`) before it is initialized
there, so no weight is ever allocated anywhere else.

Weights stay where the map put them: a layer's ``W_O``, ``W_out`` and experts are views of its
parameters on its device, moved only for the product that needs them. Everything a run captures
(residuals, patterns, values, neuron activations, MoE routing) is moved to the *contribution
device* — the embedding's, unless the caller names another — where the engine's math runs.

Offloaded weights (accelerate keeps them in CPU memory or on disk and leaves meta placeholders
in the module) are refused: llm-flow reads weights outside the forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llm_flow.errors import DeviceError, ModelLoadError
from llm_flow.placement import Device, DeviceMap, is_gpu


def check_devices(device_map: DeviceMap | None) -> None:
    """Raise :class:`DeviceError` before loading if a device map names a device this machine
    does not have."""
    if device_map is None or isinstance(device_map, str):
        return
    n_gpus = torch.cuda.device_count()
    for name, device in device_map:
        target = _torch_device(device)
        if target.type == "cuda" and (target.index or 0) >= n_gpus:
            have = f"{n_gpus} CUDA device(s)" if n_gpus else "no CUDA device"
            raise DeviceError(
                f"device_map puts {name or 'the model'} on {target}, but this machine has "
                f"{have}; map it to an existing device, or use device_map 'auto'"
            )
        if target.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceError(
                f"device_map puts {name or 'the model'} on mps, which is not available"
            )


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` with a device map (``hf_device_map``)."""
    return bool(getattr(model, "hf_device_map", None))


def check_resident(model: nn.Module) -> None:
    """Raise :class:`ModelLoadError` if any weight was offloaded (left on the meta device)."""
    placed = getattr(model, "hf_device_map", None) or {"": None}
    offloaded = [
        f"{name or 'the model'} ({device})"
        for name, device in placed.items()
        if any(p.is_meta for p in (model.get_submodule(name) if name else model).parameters())
    ]
    if not offloaded:
        return
    raise ModelLoadError(
        f"the device map offloads weights ({_first_three(offloaded)}): accelerate keeps them "
        "in CPU memory or on disk and fetches them on each forward pass, but llm-flow reads "
        "weights outside the forward pass, so each must be resident on a device; give more "
        "GPUs or a larger max_memory, use a smaller dtype (bfloat16), or a smaller model"
    )


def place(
    model: nn.Module, device: torch.device | str | None, dtype: torch.dtype
) -> tuple[nn.Module, torch.device]:
    """``(model, contribution device)``. A plain model is moved to ``device`` (default: the CPU)
    and cast to ``dtype``. A dispatched model stays where it is, in the dtype it was loaded in
    (casting it would touch every device, so ``dtype`` must be that one), and its contributions
    go to ``device``, by default the embedding's."""
    if not is_dispatched(model):
        target = torch.device(device or "cpu")
        return model.to(device=target, dtype=dtype), target
    check_resident(model)
    loaded = next(model.parameters()).dtype
    if loaded != dtype:
        have, want = (str(d).removeprefix("torch.") for d in (loaded, dtype))
        raise DeviceError(
            f"the model is split over devices in {have}, but {want} was asked for; "
            f"load it with dtype {want}, or ask for {have}"
        )
    return model, torch.device(device) if device is not None else embedding_device(model)


def embedding_device(model: nn.Module) -> torch.device:
    """Where the input token ids go: the device of the input embedding's weights."""
    return next(model.get_input_embeddings().parameters()).device  # type: ignore[operator]


def weight_devices(model: nn.Module) -> tuple[str, ...]:
    """Every device holding some of ``model``'s weights, e.g. ``("cuda:0", "cuda:1")``."""
    return tuple(sorted({str(p.device) for p in model.parameters()}))


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """The device of ``module``'s weights (``default`` for a module without any)."""
    param = next(module.parameters(), None)
    return default if param is None else param.device


def infer_device_map(
    model: nn.Module,
    device_map: str | dict[str, Device],
    max_memory: dict[Device, int | str] | None = None,
) -> dict[str, Device]:
    """The module name → device map accelerate would use for ``model`` (its weights may all be
    on the meta device): a dict is returned as it is; a strategy (``"auto"``, ``"balanced"``,
    ``"balanced_low_0"``, ``"sequential"``) is resolved within ``max_memory`` (default: what the
    devices have free) the way transformers' ``from_pretrained`` does it."""
    if isinstance(device_map, dict):
        return dict(device_map)
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map == "sequential":
        budget = get_max_memory(max_memory)
    else:
        budget = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            low_zero=device_map == "balanced_low_0",
        )
    placed: dict[str, Device] = infer_auto_device_map(
        model, max_memory=budget, no_split_module_classes=no_split
    )
    return placed


def _first_three(names: list[str]) -> str:
    """``"a, b, c and 4 more"``: an error message's list of offloaded modules."""
    more = len(names) - 3
    return ", ".join(names[:3]) + (f" and {more} more" if more > 0 else "")


def check_fits(device_map: dict[str, Device]) -> None:
    """Raise :class:`ModelLoadError` if a computed map offloads modules (to ``"disk"``, or to
    ``"cpu"`` beside GPUs): the model does not fit in the devices' memory."""
    gpus = any(is_gpu(d) for d in device_map.values())
    spilled = [
        f"{name} ({device})"
        for name, device in device_map.items()
        if device == "disk" or (device == "cpu" and gpus)
    ]
    if spilled:
        raise ModelLoadError(
            "the model does not fit in the devices' memory: accelerate would offload "
            f"{_first_three(spilled)}, "
            "whose weights llm-flow could not read; give more GPUs or a larger max_memory, or "
            "use a smaller dtype (bfloat16)"
        )


def materialize(model: nn.Module, device_map: dict[str, Device]) -> None:
    """Give every meta parameter of ``model`` uninitialized storage on the device its module is
    mapped to (buffers, computed when the model was built, are copied there). The caller
    initializes the weights afterwards, on those devices."""
    for name, device in device_map.items():
        target = _torch_device(device)
        module = model.get_submodule(name) if name else model
        buffers = {key: buf for key, buf in module.named_buffers() if not buf.is_meta}
        try:
            module.to_empty(device=target)
        except torch.OutOfMemoryError as exc:
            raise ModelLoadError(
                f"module {name or 'the model'} does not fit on {target}; give a smaller "
                "max_memory for that device (or more devices), or use a smaller dtype"
            ) from exc
        for key, buf in buffers.items():
            owner, _, attr = key.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            holder._buffers[attr] = buf.to(target)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelLoadError(f"the device map places no device for {', '.join(left[:3])}")


def dispatch(model: nn.Module, device_map: dict[str, Device]) -> nn.Module:
    """Hook ``model`` (already on the map's devices) so each module runs where its weights are;
    sets ``hf_device_map`` as ``from_pretrained`` does."""
    from accelerate import dispatch_model

    skip = getattr(model, "_skip_keys_device_placement", None)
    dispatched: nn.Module = dispatch_model(model, device_map=device_map, skip_keys=skip)
    return dispatched


def _torch_device(device: Device) -> torch.device:
    # accelerate writes GPUs as bare indices.
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def moved(tensor: Tensor, device: torch.device) -> Tensor:
    """A captured activation, detached, on the contribution ``device`` (a no-op when it is
    there already): layers on other devices hand over tensors on their own device."""
    return tensor.detach().to(device)
