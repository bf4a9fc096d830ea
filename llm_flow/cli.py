"""``llm-flow``: the engine without the app (contract in ARCHITECTURE.md, "CLI contract").

Results go to stdout (or ``--out``); progress goes to stderr only when it is a terminal, so an
error is always exactly one stderr line, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llm_flow.config import AppConfig, default_config, load_config
from llm_flow.errors import LlmFlowError, PromptError

if TYPE_CHECKING:
    from llm_flow.models import BridgeLlm

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"llm-flow: error: {message} (see llm-flow {self.prog.split()[-1]} -h)\n")
        raise SystemExit(EXIT_USAGE)


def _progress() -> Callable[[str], None] | None:
    if not sys.stderr.isatty():
        return None

    def say(message: str) -> None:
        sys.stderr.write(f"llm-flow: {message}\n")

    return say


def _quiet_libraries() -> None:
    """Library warnings would break the one-line error contract; the app shows its own."""
    warnings.filterwarnings("ignore")
    for name in ("transformers", "transformer_lens", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def _config(path: str | None) -> AppConfig:
    return load_config(path) if path else default_config()


def _add_model_args(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--config", help="JSON config (default: the repo's config/local.json)")
    p.add_argument("--model", help="model name from the config (default: its default_model)")
    if device:
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "float16", "bfloat16"),
            help="model precision; contributions always accumulate in float32",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-flow", description="Information-flow routes of transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="print model info as JSON")
    _add_model_args(info)

    graph = sub.add_parser("graph", help="contribution graph / route of a prompt")
    graph.add_argument("--prompt", required=True, help="the text to analyse")
    _add_model_args(graph)
    graph.add_argument("--threshold", type=float, default=0.04, help="τ in [0, 1] (0.04)")
    graph.add_argument("--position", type=int, default=-1, help="output position (-1: last)")
    graph.add_argument("--no-renormalize", action="store_true", help="keep raw edge weights")
    graph.add_argument("--heads", action="store_true", help="per-head weights on attention edges")
    graph.add_argument("--format", choices=("json", "graphml"), default="json")
    graph.add_argument("--out", help="write here instead of stdout")

    bench = sub.add_parser("bench", help="time forward / graph / routes and measure memory")
    _add_model_args(bench)
    bench.add_argument("--tokens", default="64,256,1024", help="comma-separated token counts")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _load(args: argparse.Namespace) -> tuple[AppConfig, BridgeLlm]:
    from llm_flow.models import load_model

    config = _config(args.config)
    spec = config.model(args.model or config.default_model)
    return config, load_model(spec, device=args.device, dtype=args.dtype, progress=_progress())


def _write(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text + "\n")
        return
    try:
        Path(out).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise LlmFlowError(f"cannot write --out {out}: {exc.strerror}") from exc


def _info(args: argparse.Namespace) -> None:
    _, llm = _load(args)
    _write(json.dumps(llm.info.to_dict(), indent=2), None)


def _graph(args: argparse.Namespace) -> None:
    from llm_flow.export import Prediction, graph_json, to_graphml
    from llm_flow.graph import trace
    from llm_flow.routes import find_route, full_graph

    if not 0.0 <= args.threshold <= 1.0:
        raise LlmFlowError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not args.prompt.strip():
        raise PromptError("the prompt is empty; pass some text with --prompt")
    config, llm = _load(args)
    limit = config.max_user_string_length
    if limit is not None and len(args.prompt) > limit:
        raise PromptError(
            f"the prompt has {len(args.prompt)} characters, over the config's "
            f"max_user_string_length of {limit}; shorten it or raise the limit"
        )
    run, graph = trace(llm, args.prompt, keep_patterns=args.heads)
    if not -run.n_tokens <= args.position < run.n_tokens:
        raise LlmFlowError(
            f"--position {args.position} is outside the prompt's {run.n_tokens} tokens "
            f"(valid: -{run.n_tokens} … {run.n_tokens - 1})"
        )
    renormalize = not args.no_renormalize
    if args.threshold == 0 and not renormalize:
        route = full_graph(graph)
    else:
        route = find_route(graph, [args.position], args.threshold, renormalize)
    position = run.position(args.position)
    data = graph_json(
        graph,
        route,
        Prediction.of(llm, run, position),
        position=position,
        run=run if args.heads else None,
    )
    text = json.dumps(data) if args.format == "json" else to_graphml(data)
    _write(text, args.out)


def _bench(args: argparse.Namespace) -> None:
    from llm_flow.bench import bench, format_table

    try:
        counts = [int(x) for x in args.tokens.split(",") if x.strip()]
    except ValueError:
        raise LlmFlowError(
            f"--tokens must be comma-separated integers, got '{args.tokens}'"
        ) from None
    if not counts or min(counts) < 2:
        raise LlmFlowError(f"--tokens needs token counts ≥ 2, got '{args.tokens}'")
    _, llm = _load(args)
    rows = bench(llm, counts, progress=_progress())
    if args.json:
        _write(json.dumps([r.to_dict() for r in rows], indent=2), None)
    else:
        _write(
            f"{llm.info.name} on {llm.info.device} ({llm.info.dtype})\n" + format_table(rows), None
        )


COMMANDS = {"info": _info, "graph": _graph, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        COMMANDS[args.command](args)
    except LlmFlowError as exc:
        message = " ".join(str(exc).split())  # exactly one line
        sys.stderr.write(f"llm-flow: error: {message}\n")
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
