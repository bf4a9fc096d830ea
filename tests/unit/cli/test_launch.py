"""Tests for llm_flow/cli/launch.py and ``llm-flow app``: the command line Streamlit gets, and
one-line errors for what cannot start (no server is started here; tests/integration/test_wheel.py
starts one from an installed wheel)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llm_flow import resources
from llm_flow.cli import launch
from tests.cli_runner import run_cli

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The command lines ``llm-flow app`` would run (nothing is run)."""
    commands: list[list[str]] = []

    def record(argv: list[str]) -> int:
        commands.append(argv)
        return 0

    monkeypatch.setattr(launch, "run", record)
    return commands


def _split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(options before the script, the script, the script's arguments)."""
    assert argv[:4] == [sys.executable, "-m", "streamlit", "run"]
    dash = argv.index("--")
    return argv[4 : dash - 1], argv[dash - 1], argv[dash + 1 :]


def test_app_runs_the_bundled_script_on_the_bundled_config(
    capsys: pytest.CaptureFixture[str], launched: list[list[str]]
) -> None:
    code, out, err = run_cli(capsys, "app")
    assert (code, out, err) == (0, "", "")
    (argv,) = launched
    options, script, script_args = _split(argv)
    assert script == str(REPO / "app" / "main.py")  # a checkout: the repository's own files
    assert script_args == [str(REPO / "config" / "local.json")]
    # The app's .streamlit/config.toml, which Streamlit only reads from the working directory.
    assert options == [
        "--client.toolbarMode",
        "viewer",
        "--client.showErrorDetails",
        "none",
        "--browser.gatherUsageStats",
        "false",
    ]


def test_extra_options_go_to_streamlit_after_the_apps_settings(
    capsys: pytest.CaptureFixture[str], launched: list[list[str]], tmp_path: Path
) -> None:
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"models": {"gpt2": None}}), encoding="utf-8")
    code, _, err = run_cli(
        capsys,
        "app",
        "--server.port",
        "8600",
        "--config",
        str(config),
        "--server.headless=true",
        "--client.toolbarMode",
        "auto",
    )
    assert (code, err) == (0, "")
    options, _, script_args = _split(launched[0])
    assert script_args == [str(config.resolve())]
    user = ["--server.port", "8600", "--server.headless=true", "--client.toolbarMode", "auto"]
    assert options[-len(user) :] == user  # last, so the user's toolbarMode wins
    assert options.index("--client.toolbarMode") < options.index("--server.port")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "missing.json"], "--config missing.json: no such file"),
        (["--prot", "8600"], "'--prot' is neither an option of llm-flow app nor a Streamlit"),
        (["--server.port"], "--server.port needs a value"),
        (["--server.port", "--server.headless", "true"], "--server.port needs a value"),
        (["8600"], "'8600' is neither an option"),
    ],
)
def test_what_cannot_start_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], launched: list[list[str]], argv: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, "app", *argv)
    assert code == 2 and out == "" and launched == []
    assert err.count("\n") == 1 and message in err, err


def test_a_bad_config_is_refused_before_the_server_starts(
    capsys: pytest.CaptureFixture[str], launched: list[list[str]], tmp_path: Path
) -> None:
    config = tmp_path / "bad.json"
    config.write_text('{"models": {"x": 3}}', encoding="utf-8")
    code, _, err = run_cli(capsys, "app", "--config", str(config))
    assert code == 2 and launched == []
    assert err.startswith("llm-flow: error:") and err.count("\n") == 1


def test_missing_bundled_files_and_streamlit_say_what_to_do(
    capsys: pytest.CaptureFixture[str],
    launched: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(resources, "root", lambda: tmp_path)  # an install without the bundle
    code, _, err = run_cli(capsys, "app")
    assert code == 2 and "bundled config" in err and "reinstall llm-flow" in err
    monkeypatch.undo()

    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli(capsys, "app")
    assert code == 2 and "streamlit is not installed" in err
    assert launched == []


def test_other_commands_still_refuse_unknown_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "info", "--server.port", "8600")
    assert code == 2
    assert "unrecognized arguments: --server.port 8600" in err and "(see llm-flow -h)" in err


def test_settings_become_options(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[server]\nport = 8601\nheadless = true\n[theme]\nbase = "dark"\n')
    assert launch.settings_options(path) == [
        "--server.port",
        "8601",
        "--server.headless",
        "true",
        "--theme.base",
        "dark",
    ]
