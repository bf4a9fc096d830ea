"""Helpers the ``llm-flow`` commands share: the config and model from the common arguments,
progress on stderr, writing the JSON result."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_flow.config import AppConfig, ModelSpec, default_config, load_config
from llm_flow.errors import InputError, LlmFlowError
from llm_flow.placement import DeviceMap, parse_device_map

if TYPE_CHECKING:
    from llm_flow.distributed import ModelRecipe, RayOptions
    from llm_flow.engine.trace import Trace
    from llm_flow.models import BridgeLlm
    from llm_flow.models.sae import Sae


def stderr_progress() -> Callable[[str], None] | None:
    if not sys.stderr.isatty():
        return None

    def say(message: str) -> None:
        sys.stderr.write(f"llm-flow: {message}\n")

    return say


def config_arg(path: str | None) -> AppConfig:
    return load_config(path) if path else default_config()


def model_spec(args: argparse.Namespace, config: AppConfig) -> ModelSpec:
    """The config entry of ``--model`` (or the default model), with ``--device-map`` applied."""
    spec = config.model(args.model or config.default_model)
    if args.device_map is not None:
        spec = replace(spec, device_map=device_map_arg(args.device_map))
    return spec


def load_llm(args: argparse.Namespace, config: AppConfig) -> BridgeLlm:
    from llm_flow.models import load_model

    spec = model_spec(args, config)
    return load_model(spec, device=args.device, dtype=args.dtype, progress=stderr_progress())


def check_ray_args(args: argparse.Namespace) -> None:
    if args.workers is not None and args.ray is None:
        raise InputError("--workers goes with --ray; add --ray to run on Ray workers")


def ray_job(args: argparse.Namespace, config: AppConfig) -> tuple[ModelRecipe, RayOptions]:
    """What ``--ray [ADDRESS]`` and ``--workers`` ask for: the model every worker loads and where
    the job runs. Imports :mod:`llm_flow.distributed` (never imported without ``--ray``)."""
    from llm_flow.distributed import ModelRecipe, RayOptions

    recipe = ModelRecipe(model_spec(args, config), device=args.device, dtype=args.dtype)
    return recipe, RayOptions(address=args.ray, workers=args.workers)


def device_map_arg(text: str) -> DeviceMap:
    """``--device-map``: a strategy name, or a JSON object module name → device."""
    value: Any = text
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"--device-map is not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
    parsed = parse_device_map(value, "--device-map")
    assert parsed is not None  # a string or an object is never None
    return parsed


def write_out(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text + "\n")
        return
    try:
        Path(out).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise LlmFlowError(f"cannot write --out {out}: {exc.strerror}") from exc


def check_pair(args: argparse.Namespace) -> None:
    if (args.target is None) != (args.distractor is None):
        raise InputError("--target and --distractor go together; pass both or neither")


def prompt_header(tr: Trace) -> dict[str, Any]:
    return {"model": tr.llm.info.name, "tokens": list(tr.tokens), "token_ids": list(tr.token_ids)}


def sae_arg(
    args: argparse.Namespace, config: AppConfig, kind: str, layer: int, hook: str | None = None
) -> Sae:
    """The SAE on the residual node of ``kind`` at ``layer``: ``--sae`` (read for ``hook``
    when given), else the model's config entry or the one ``sae train`` saved."""
    from llm_flow.models.sae import find_sae, load_sae

    if args.sae is not None:
        return load_sae(args.sae, hook)
    spec = config.model(args.model or config.default_model)
    return find_sae(spec.saes, spec.name, kind, layer)


def hook_sae(args: argparse.Namespace, config: AppConfig, hook: str, sae: str | None) -> Sae:
    """The SAE on residual ``hook``: ``sae`` (a path or repo, read for ``hook``) when given,
    else the model's as :func:`sae_arg` finds it for the node the hook reads."""
    from llm_flow.engine.nodes import parse_node
    from llm_flow.models.sae import find_sae, load_sae, node_of_hook

    if sae is not None:
        return load_sae(sae, hook)
    node = parse_node(node_of_hook(hook, 0))
    assert node is not None  # node_of_hook names a node
    spec = config.model(args.model or config.default_model)
    return find_sae(spec.saes, spec.name, node.kind, node.layer)
