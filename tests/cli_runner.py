"""Run the ``llm-flow`` CLI in-process and capture what a user would see."""

from __future__ import annotations

import pytest

from llm_flow.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``llm-flow argv…``; argparse's usage errors exit via
    SystemExit, so those are caught too."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
