"""Where a model's weights go when one device is too small: validated ``device_map`` and
``max_memory`` values, as transformers' ``from_pretrained`` (accelerate's big-model dispatch)
accepts them.

Pure checks, no torch: :class:`~llm_flow.config.ModelSpec` calls them on config entries, and the
CLI and the Python API on their arguments, so every front end reports the same words. Values are
returned in hashable form (tuples of pairs), since a spec is part of the app's cache keys;
:func:`as_dict` turns them back into what accelerate takes.

Offload targets (``"disk"``, ``"meta"``, or ``"cpu"`` next to a GPU, which accelerate offloads
too) are refused: llm-flow reads weights such as ``W_O`` and ``W_out`` directly, outside any
forward pass, and an offloaded module holds only empty placeholders there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from llm_flow.errors import ConfigError

# accelerate's strategies: "auto" is "balanced" (layers spread evenly over the GPUs),
# "balanced_low_0" leaves the first GPU lighter (it also holds the contributions), "sequential"
# fills each GPU in turn.
STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
Device = int | str
DeviceMap = str | tuple[tuple[str, Device], ...]
MaxMemory = tuple[tuple[Device, int | str], ...]

_ACCELERATOR = re.compile(r"^(cuda|xpu|npu|mlu|hpu)(:\d+)?$")
_OFFLOAD = ("disk", "meta")
# What accelerate's convert_file_size_to_int reads: bytes with a decimal or binary unit.
_SIZE = re.compile(r"^\d+(\.\d+)?(KB|MB|GB|KiB|MiB|GiB)$", re.IGNORECASE)


def is_gpu(device: Device) -> bool:
    """A GPU index or an accelerator name such as ``"cuda:1"``."""
    return isinstance(device, int) or bool(_ACCELERATOR.match(device))


def _device(value: Any, where: str) -> Device:
    """One target of a device map: a GPU index, ``"cpu"``, ``"mps"`` or ``"cuda:N"``-like."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _OFFLOAD:
            raise ConfigError(
                f"{where}: {value!r} offloads weights, which llm-flow cannot read outside a "
                "forward pass; put every module on a GPU or the CPU (or use more GPUs, or a "
                "smaller dtype)"
            )
        if text in ("cpu", "mps") or _ACCELERATOR.match(text):
            return text
    raise ConfigError(
        f"{where}: unknown device {value!r}; use a GPU index (0, 1, …), 'cuda:N', 'cpu' or 'mps'"
    )


def parse_device_map(value: Any, where: str = "device_map") -> DeviceMap | None:
    """A strategy name or a mapping module name → device, checked; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in STRATEGIES:
            raise ConfigError(
                f"{where}: unknown strategy {value!r}; valid strategies are "
                f"{', '.join(repr(s) for s in STRATEGIES)}, or an object mapping module names "
                "(e.g. 'model.layers.0') to devices"
            )
        return value
    if isinstance(value, tuple):  # already parsed (a spec rebuilt with dataclasses.replace)
        value = dict(value)
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            f"{where}: expected one of {', '.join(repr(s) for s in STRATEGIES)} or a non-empty "
            f"object mapping module names to devices, got {value!r}"
        )
    placed: list[tuple[str, Device]] = []
    for name, device in value.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: module names must be strings, got {name!r}")
        placed.append((name, _device(device, f"{where}[{name!r}]")))
    targets = {device for _, device in placed}
    if "cpu" in targets and any(is_gpu(d) for d in targets):
        raise ConfigError(
            f"{where}: mixes 'cpu' with GPUs; accelerate would offload the CPU modules (their "
            "weights are fetched on each forward pass), which llm-flow cannot read; put every "
            "module on a GPU, or every module on the CPU"
        )
    return tuple(placed)


def parse_max_memory(value: Any, where: str = "max_memory") -> MaxMemory | None:
    """A mapping device → budget (``"70GiB"``, ``"500MB"`` or bytes), checked; GPU keys become
    indices (``"0"`` and ``"cuda:0"`` → 0), as accelerate wants them."""
    if value is None:
        return None
    if isinstance(value, tuple):
        value = dict(value)
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            f"{where}: expected an object mapping devices to sizes, e.g. "
            f'{{"0": "70GiB", "1": "70GiB", "cpu": "100GiB"}}, got {value!r}'
        )
    budgets: list[tuple[Device, int | str]] = []
    for key, size in value.items():
        device = _memory_device(key, f"{where}[{key!r}]")
        if isinstance(size, bool) or not (
            (isinstance(size, int) and size > 0) or (isinstance(size, str) and _SIZE.match(size))
        ):
            raise ConfigError(
                f"{where}[{key!r}]: expected a size like '70GiB' or '500MB', or a number of "
                f"bytes, got {size!r}"
            )
        budgets.append((device, size))
    return tuple(budgets)


def _memory_device(key: Any, where: str) -> Device:
    if isinstance(key, str):
        text = key.strip().lower()
        if text.isdigit():
            return int(text)
        if text.startswith("cuda:") and text[5:].isdigit():
            return int(text[5:])
        if text in ("cpu", "mps"):
            return text
    elif isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    raise ConfigError(
        f"{where}: unknown device {key!r}; use a GPU index ('0', '1', …), 'cpu' or 'mps'"
    )


def as_dict(pairs: tuple[tuple[Any, Any], ...] | None) -> dict[Any, Any] | None:
    """A parsed mapping as the dict accelerate takes (``None`` stays ``None``)."""
    return None if pairs is None else dict(pairs)


def device_map_arg(device_map: DeviceMap | None) -> str | dict[str, Device] | None:
    """A parsed device map as ``from_pretrained`` takes it: a strategy name or a dict."""
    return device_map if device_map is None or isinstance(device_map, str) else dict(device_map)
