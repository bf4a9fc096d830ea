"""Where llm-flow's bundled files live: the Streamlit app (``app/``), its Streamlit settings
(``.streamlit/config.toml``), the configs (``config/local.json``, the random-model shapes in
``config/shapes/``), the sample prompts and the shipped corpus (``sample_inputs/``).

In a checkout they are the repository's own folders. A wheel ships them inside the package, under
``llm_flow/bundle/`` (pyproject.toml maps the repository root there), laid out exactly as in the
repository, so a config's relative paths (``sample_inputs/…``, resolved against the parent of its
``config/`` folder) mean the same in both. This module is the only one that knows the two places.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
BUNDLE = _PACKAGE / "bundle"


def root() -> Path:
    """The folder holding ``app/``, ``config/`` and ``sample_inputs/``: the wheel's bundle when
    installed, else the checkout that holds this package."""
    return BUNDLE if BUNDLE.is_dir() else _PACKAGE.parent


def app_script() -> Path:
    """The Streamlit script of the explorer (what ``streamlit run`` takes)."""
    return root() / "app" / "main.py"


def streamlit_config() -> Path:
    """The app's Streamlit settings (Streamlit reads them only from the working directory)."""
    return root() / ".streamlit" / "config.toml"


def default_config_file() -> Path:
    """``config/local.json``: the packaged models and the hub models the app offers."""
    return root() / "config" / "local.json"


def shapes_dir() -> Path:
    """``config/shapes/``: the shipped ``config.json`` of each ``random:SHAPE`` model."""
    return root() / "config" / "shapes"


def sample_inputs_dir() -> Path:
    """``sample_inputs/``: prompt files and the benchmark's text."""
    return root() / "sample_inputs"


def default_corpus_dir() -> Path:
    """``sample_inputs/corpus/``: the shipped public-domain books the corpus index reads when no
    corpus is named (its README.md says where each comes from)."""
    return sample_inputs_dir() / "corpus"
