"""``llm-flow app``: start the Streamlit explorer from any folder.

The app, its Streamlit settings and the default config ship with the package
(:mod:`llm_flow.resources` finds them in a wheel and in a checkout). The core never imports
Streamlit: the explorer runs as ``python -m streamlit run`` in place of this process, with

    streamlit run [the app's settings] [the user's options] APP_SCRIPT -- CONFIG

The app's settings (``.streamlit/config.toml``) are passed as options because Streamlit reads that
file only from the working directory; the user's options come after them, so they win.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from llm_flow import resources
from llm_flow.config import load_config
from llm_flow.errors import ConfigError, InputError, LaunchError

# Streamlit's command-line options are its config options: --section.option VALUE.
_OPTION = re.compile(r"^--[A-Za-z]+\.[A-Za-z]+(=.*)?$")
_EXAMPLE = "--server.port 8600 --server.headless true"


def settings_options(path: Path) -> list[str]:
    """A Streamlit ``config.toml`` as options: ``[client] toolbarMode = "viewer"`` becomes
    ``--client.toolbarMode viewer``."""
    try:
        with path.open("rb") as f:
            sections = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LaunchError(f"the app's Streamlit settings {path} cannot be read: {exc}") from exc
    options: list[str] = []
    for section, values in sections.items():
        for name, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            options += [f"--{section}.{name}", text]
    return options


def check_options(options: Sequence[str]) -> None:
    """Every extra argument must be a Streamlit option with its value (``--server.port 8600`` or
    ``--server.port=8600``): anything else is a typo that Streamlit would report far less
    clearly."""
    i = 0
    while i < len(options):
        option = options[i]
        if not _OPTION.match(option):
            raise InputError(
                f"{option!r} is neither an option of llm-flow app nor a Streamlit option; "
                f"Streamlit options look like {_EXAMPLE} (see streamlit run --help)"
            )
        if "=" in option:
            i += 1
            continue
        if i + 1 == len(options) or options[i + 1].startswith("--"):
            raise InputError(f"{option} needs a value, as in {_EXAMPLE}")
        i += 2


def config_file(path: str | None) -> Path:
    """``--config`` (checked now, so a bad file is one line here rather than a page of errors in
    the browser), else the bundled ``config/local.json``."""
    if path is None:
        bundled = resources.default_config_file()
        if not bundled.is_file():
            raise LaunchError(
                f"the bundled config {bundled} is missing; reinstall llm-flow or pass --config"
            )
        return bundled
    chosen = Path(path).expanduser()
    if not chosen.is_file():
        raise ConfigError(f"--config {path}: no such file")
    load_config(chosen)
    return chosen.resolve()


def command(config: str | None, options: Sequence[str]) -> list[str]:
    """The command line that starts the explorer (checked: config, options, Streamlit)."""
    check_options(options)
    path = config_file(config)
    script = resources.app_script()
    if not script.is_file():
        raise LaunchError(f"the explorer's script {script} is missing; reinstall llm-flow")
    if importlib.util.find_spec("streamlit") is None:
        raise LaunchError(
            f"streamlit is not installed for {sys.executable}; pip install 'streamlit>=1.40'"
        )
    settings = settings_options(resources.streamlit_config())
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        *settings,
        *options,
        str(script),
        "--",
        str(path),
    ]


def run(argv: list[str]) -> int:
    """Run the server. On POSIX it replaces this process, so Ctrl-C and a ``kill`` reach
    Streamlit itself (a child process would outlive a killed launcher)."""
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)
    return subprocess.call(argv)  # pragma: no cover - Windows
