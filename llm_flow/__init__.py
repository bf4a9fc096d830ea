"""llm-flow: explore information-flow routes in transformer language models.

Ferrando & Voita 2024, "Information Flow Routes" (arXiv 2403.00824). The Python API
(:mod:`llm_flow.api`)::

    import llm_flow as lf
    tr = lf.trace(lf.load(), "The capital of France is")
    tr.route(threshold=0.04).figure()

The API's names load on first use, so ``import llm_flow`` (and the ``llm-flow`` command's
start-up) stays fast. See docs/architecture.md for how the package is organised.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llm_flow.api import (
        Route,
        Trace,
        ablate,
        ablate_latents,
        attend,
        build_index,
        edge_latents,
        faithfulness,
        from_hf,
        latents,
        load,
        load_sae,
        mean_activations,
        top_examples,
        top_latent_examples,
        trace,
    )
    from llm_flow.errors import LlmFlowError

__all__ = [
    "LlmFlowError",
    "Route",
    "Trace",
    "__version__",
    "ablate",
    "ablate_latents",
    "attend",
    "build_index",
    "edge_latents",
    "faithfulness",
    "from_hf",
    "latents",
    "load",
    "load_sae",
    "mean_activations",
    "top_examples",
    "top_latent_examples",
    "trace",
]
_API = set(__all__) - {"LlmFlowError", "__version__"}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module("llm_flow.api"), name)
    if name == "LlmFlowError":
        return import_module("llm_flow.errors").LlmFlowError
    raise AttributeError(f"module 'llm_flow' has no attribute {name!r}")
