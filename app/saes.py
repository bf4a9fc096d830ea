"""The explorer's sparse autoencoders: which SAE a residual node or hook has, and the SAEs as
loaded, in one bounded process-wide cache shared by every browser session.

A node's SAE is found as ``llm-flow latents`` and ``lf.latents`` find it
(:func:`llm_flow.models.sae.locate_sae`): the model's config entry ``"saes"``, else the one
``llm-flow sae train`` saved in the cache dir. A found SAE is a :class:`SaeRef`, the cache key of
everything computed with it; a local one carries its weights' mtime, so a retrained SAE is read
again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from app.bounded import BoundedCache
from llm_flow.config import ModelSpec
from llm_flow.engine.nodes import parse_node
from llm_flow.errors import SaeError
from llm_flow.models.sae import (
    NPZ_FILE,
    WEIGHTS_FILE,
    Sae,
    load_sae,
    locate_sae,
    node_of_hook,
    sae_hooks,
)

MAX_SAES = 4  # a Gemma Scope SAE of a 2B model's residual holds ~150 M floats


@dataclass(frozen=True)
class SaeRef:
    """One SAE as found for a model: the hook it reads and where it is (a folder, a
    ``params.npz`` or a hub repository; ``modified_ns``: a local one's weights' mtime, else 0)."""

    hook: str
    source: str
    modified_ns: int


@dataclass(frozen=True)
class LatentEdit:
    """An intervention on SAE latents: their parts scaled by ``scale`` (0 removes them)."""

    sae: SaeRef
    indices: tuple[int, ...]
    scale: float

    def __str__(self) -> str:
        return f"{self.sae.hook}:{','.join(map(str, self.indices))} ×{self.scale:g}"


def _ref(hook: str, source: str) -> SaeRef:
    path = Path(source)
    weights = next((p for p in (path / WEIGHTS_FILE, path / NPZ_FILE, path) if p.is_file()), None)
    return SaeRef(hook, source, 0 if weights is None else weights.stat().st_mtime_ns)


def node_sae(spec: ModelSpec, kind: str, layer: int) -> SaeRef | None:
    """The SAE on the residual node of ``kind`` (X, A or I) at ``layer``, None when it has none."""
    found = locate_sae(spec.saes, spec.name, kind, layer)
    return None if found is None else _ref(*found)


def model_sae_hooks(spec: ModelSpec) -> tuple[str, ...]:
    """Every hook the model has an SAE on (config entry and trained ones)."""
    return sae_hooks(spec.saes, spec.name)


def hook_sae(spec: ModelSpec, hook: str) -> SaeRef:
    """The SAE on the node ``hook`` reads, as ``llm-flow ablate --latents`` finds it;
    :class:`SaeError` naming the hooks that have one otherwise."""
    node = parse_node(node_of_hook(hook, 0))  # checks the hook name
    assert node is not None  # node_of_hook spells valid node ids
    found = node_sae(spec, node.kind, node.layer)
    if found is None:
        have = model_sae_hooks(spec)
        raise SaeError(
            f"model {spec.name!r} has no SAE on {hook!r}; "
            + (f"it has SAEs on {', '.join(have)}" if have else "it has no SAEs")
        )
    return found


@st.cache_resource(show_spinner=False)
def store() -> BoundedCache[SaeRef, Sae]:
    return BoundedCache(MAX_SAES)


def get_sae(ref: SaeRef) -> Sae:
    """The SAE ``ref`` names, loaded once (:class:`SaeError`, not cached, when it cannot be)."""
    return store().get(ref, lambda: load_sae(ref.source, ref.hook))
