"""The ``llm-flow`` command (contract in docs/architecture.md, "Command line")."""

from llm_flow.cli.main import main

__all__ = ["main"]
