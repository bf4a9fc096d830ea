"""A model entry's ``"saes"``: SAELens hook name → where its sparse autoencoder is.

Checked here, without torch, so that :mod:`llm_flow.config` can validate a config file before
anything is loaded (:mod:`llm_flow.models.sae` reads the SAEs themselves). Keys are residual hooks
as SAELens names them, ``blocks.{l}.hook_resid_pre|mid|post``; values are a SAELens folder, a Gemma
Scope ``params.npz`` or a hub repository ``owner/name[/folder]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_flow.errors import ConfigError

SAE_HOOK = re.compile(r"^blocks\.\d+\.hook_resid_(pre|mid|post)$")
EXAMPLE = '{"blocks.3.hook_resid_post": "saes/layer3"}'


def parse_saes(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """``value`` (a mapping or pairs) as sorted (hook, source) pairs, hashable; every hook a
    residual hook name and every source a non-empty string, else :class:`ConfigError`."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(hook, source) for hook, source in items]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: expected an object hook name → SAE path or hub repo, e.g. {EXAMPLE}"
        ) from None
    for hook, source in pairs:
        if not isinstance(hook, str) or not SAE_HOOK.match(hook):
            raise ConfigError(
                f"{where}: {json.dumps(hook)} is not a residual hook name; valid keys are "
                "blocks.{l}.hook_resid_pre, blocks.{l}.hook_resid_mid and "
                "blocks.{l}.hook_resid_post"
            )
        if not isinstance(source, str) or not source:
            raise ConfigError(
                f"{where}[{hook!r}]: expected an SAE folder, a params.npz path or a hub repo "
                f"'owner/name[/folder]', got {json.dumps(source)}"
            )
    return tuple(sorted(pairs))


def sae_source(value: Any, base: Path) -> Any:
    """A relative SAE path resolved against the config's base directory when it names something
    there (or looks like a path); anything else is kept as it is: a hub repository."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    resolved = path if path.is_absolute() else base / path
    if value.startswith((".", "/", "~")) or resolved.exists():
        return str(resolved)
    return value
