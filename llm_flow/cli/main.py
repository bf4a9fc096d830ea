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
from typing import TYPE_CHECKING, Any

from llm_flow.config import AppConfig, default_config, load_config
from llm_flow.errors import LlmFlowError, PromptError

if TYPE_CHECKING:
    from llm_flow.analyses.interventions import Ablation, AblationResult, MeanActivations
    from llm_flow.models import BridgeLlm

EXIT_USAGE = 2
DEFAULT_MEAN_PROMPTS = "factual.txt"


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


def _add_contrast_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="target token, e.g. ' Mary' (needs --distractor)")
    p.add_argument("--distractor", help="distractor token, e.g. ' John' (needs --target)")


def _add_ablation_args(p: argparse.ArgumentParser, *, default_mode: str) -> None:
    p.add_argument("--mode", choices=("zero", "mean"), default=default_mode)
    p.add_argument(
        "--mean-prompts",
        help="prompt file whose mean activations mean ablation uses "
        f"(default: {DEFAULT_MEAN_PROMPTS} in the config's prompts_dir)",
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
    _add_contrast_args(graph)

    ablate = sub.add_parser("ablate", help="zero- or mean-ablate heads, neurons or edges")
    ablate.add_argument("--prompt", required=True, help="the text to analyse")
    _add_model_args(ablate)
    ablate.add_argument("--heads", default="", help="LAYER.HEAD[,…], e.g. 9.3,10.7")
    ablate.add_argument("--neurons", default="", help="LAYER.NEURON[,…], e.g. 5.120")
    ablate.add_argument(
        "--edges", default="", help="LAYER:SOURCE>TARGET or LAYER.HEAD:SOURCE>TARGET[,…]"
    )
    _add_ablation_args(ablate, default_mode="zero")
    ablate.add_argument("--position", type=int, default=-1, help="output position (-1: last)")
    ablate.add_argument("--top", type=int, default=5, help="tokens listed before/after (5)")
    ablate.add_argument(
        "--graph-diff",
        action="store_true",
        help="also trace the ablated run and compare its route with the original one",
    )
    ablate.add_argument(
        "--threshold", type=float, default=0.04, help="τ of the --graph-diff routes (0.04)"
    )
    ablate.add_argument(
        "--no-renormalize", action="store_true", help="--graph-diff routes with raw weights"
    )
    _add_contrast_args(ablate)

    faith = sub.add_parser(
        "faithfulness", help="keep only the route's components: how much survives"
    )
    faith.add_argument("--prompt", required=True, help="the text to analyse")
    _add_model_args(faith)
    faith.add_argument("--threshold", type=float, default=0.04, help="τ in [0, 1] (0.04)")
    faith.add_argument("--position", type=int, default=-1, help="output position (-1: last)")
    faith.add_argument("--seeds", type=int, default=5, help="random-ablation seeds (5)")
    faith.add_argument(
        "--no-renormalize",
        action="store_true",
        help="the route with raw edge weights (same components and scores)",
    )
    _add_ablation_args(faith, default_mode="mean")
    faith.add_argument("--target", help="target token (default: the model's prediction)")
    faith.add_argument("--distractor", help="distractor token (metric: logit difference)")

    dataset = sub.add_parser("dataset", help="head / FFN frequencies in the routes of a file")
    dataset.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    _add_model_args(dataset)
    dataset.add_argument("--threshold", type=float, default=0.04, help="τ in [0, 1] (0.04)")
    dataset.add_argument("--out", help="RESULTS.csv or RESULTS.parquet (default: CSV to stdout)")

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
    from llm_flow.engine.graph import trace
    from llm_flow.engine.routes import find_route, full_graph
    from llm_flow.io.export import Prediction, graph_json, to_graphml

    if not 0.0 <= args.threshold <= 1.0:
        raise LlmFlowError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not args.prompt.strip():
        raise PromptError("the prompt is empty; pass some text with --prompt")
    _contrast_pair(args)
    config, llm = _load(args)
    limit = config.max_user_string_length
    if limit is not None and len(args.prompt) > limit:
        raise PromptError(
            f"the prompt has {len(args.prompt)} characters, over the config's "
            f"max_user_string_length of {limit}; shorten it or raise the limit"
        )
    want_contrast = args.target is not None
    run, graph = trace(llm, args.prompt, keep_patterns=args.heads or want_contrast)
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
    pair = direct = None
    if want_contrast:
        from llm_flow.analyses.contrast import contrast, direct_effects

        pair = contrast(llm, run, args.target, args.distractor, position)
        direct = direct_effects(llm, run, pair)
    data = graph_json(
        graph,
        route,
        Prediction.of(llm, run, position),
        position=position,
        run=run if args.heads else None,
        contrast=pair,
        direct=direct,
    )
    text = json.dumps(data) if args.format == "json" else to_graphml(data)
    _write(text, args.out)


def _bench(args: argparse.Namespace) -> None:
    from llm_flow.cli.bench import bench, format_table

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


def _contrast_pair(args: argparse.Namespace) -> None:
    if (args.target is None) != (args.distractor is None):
        raise LlmFlowError("--target and --distractor go together; pass both or neither")


def _checked_prompt(config: AppConfig, prompt: str) -> str:
    if not prompt.strip():
        raise PromptError("the prompt is empty; pass some text with --prompt")
    limit = config.max_user_string_length
    if limit is not None and len(prompt) > limit:
        raise PromptError(
            f"the prompt has {len(prompt)} characters, over the config's "
            f"max_user_string_length of {limit}; shorten it or raise the limit"
        )
    return prompt


def _threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise LlmFlowError(f"--threshold must be in [0, 1], got {value}")
    return value


def _means(args: argparse.Namespace, config: AppConfig, llm: BridgeLlm) -> MeanActivations | None:
    """Mean activations over --mean-prompts (or the default file) when --mode is mean."""
    if args.mode != "mean":
        return None
    from llm_flow.analyses.interventions import mean_activations
    from llm_flow.io.prompts import read_prompt_file

    if args.mean_prompts is not None:
        path = Path(args.mean_prompts)
    elif config.prompts_dir is not None and (config.prompts_dir / DEFAULT_MEAN_PROMPTS).is_file():
        path = config.prompts_dir / DEFAULT_MEAN_PROMPTS
    else:
        raise LlmFlowError(
            f"mean ablation needs reference prompts: pass --mean-prompts FILE (there is no "
            f"{DEFAULT_MEAN_PROMPTS} in the config's prompts_dir), or use --mode zero"
        )
    return mean_activations(llm, read_prompt_file(path), source=str(path))


def _ablate(args: argparse.Namespace) -> None:
    from llm_flow.analyses.contrast import contrast_ids
    from llm_flow.analyses.interventions import (
        Ablation,
        ablate,
        parse_edges,
        parse_heads,
        parse_neurons,
        validate,
    )

    _contrast_pair(args)
    ablation = Ablation(
        heads=parse_heads(args.heads),
        neurons=parse_neurons(args.neurons),
        edges=parse_edges(args.edges),
        mode=args.mode,
    )
    if ablation.is_empty:
        raise LlmFlowError("nothing to ablate; pass --heads, --neurons and/or --edges")
    if args.top < 1:
        raise LlmFlowError(f"--top must be at least 1, got {args.top}")
    _threshold(args.threshold)
    config, llm = _load(args)
    prompt = _checked_prompt(config, args.prompt)
    ids = llm.tokenize(prompt)
    validate(ablation, llm.info, len(ids))  # before the mean pass: report bad ids at once
    a = b = None
    if args.target is not None:
        a, b = contrast_ids(llm, args.target, args.distractor)
    means = _means(args, config, llm)
    ab_kw: dict[str, Any] = {
        "means": means,
        "target_id": a,
        "distractor_id": b,
        "position": args.position,
        "k": args.top,
    }
    diff = None
    if args.graph_diff:  # the traced runs' logits serve the before/after report too
        result, diff = _graph_diff(args, llm, prompt, ablation, ab_kw)
    else:
        result = ablate(llm, prompt, ablation, **ab_kw)
    data = {
        "model": llm.info.name,
        "tokens": llm.token_strings(ids),
        "token_ids": ids,
        "target": args.target,
        "distractor": args.distractor,
    } | result.to_dict()
    if diff is not None:
        data["graph_diff"] = diff
    _write(json.dumps(data), None)


def _graph_diff(
    args: argparse.Namespace,
    llm: BridgeLlm,
    prompt: str,
    ablation: Ablation,
    ab_kw: dict[str, Any],
) -> tuple[AblationResult, dict[str, Any]]:
    """Trace ``prompt`` without and with ``ablation``: the before/after report, and the routes to
    the output position compared edge by edge."""
    from llm_flow.analyses.interventions import ablated_trace, compare, validate
    from llm_flow.analyses.route_diff import RouteDiff
    from llm_flow.engine.graph import trace
    from llm_flow.engine.routes import find_route

    threshold, renormalize = _threshold(args.threshold), not args.no_renormalize
    checked = validate(ablation, llm.info, len(llm.tokenize(prompt)))
    run_before, before = trace(llm, prompt, keep_patterns=False)
    run_after, after = ablated_trace(llm, prompt, checked, ab_kw["means"], keep_patterns=False)
    result = compare(llm, checked, run_before.logits, run_after.logits, **ab_kw)
    diff = RouteDiff(
        find_route(before, [result.position], threshold, renormalize),
        find_route(after, [result.position], threshold, renormalize),
    )
    return result, diff.to_dict()


def _faithfulness(args: argparse.Namespace) -> None:
    from llm_flow.analyses.faithfulness import faithfulness

    threshold = _threshold(args.threshold)
    if args.seeds < 1:
        raise LlmFlowError(f"--seeds must be at least 1, got {args.seeds}")
    if args.distractor is not None and args.target is None:
        raise LlmFlowError("--distractor needs --target too (or pass only --target)")
    config, llm = _load(args)
    prompt = _checked_prompt(config, args.prompt)
    n_tokens = len(llm.tokenize(prompt))
    if not -n_tokens <= args.position < n_tokens:
        raise LlmFlowError(
            f"--position {args.position} is outside the prompt's {n_tokens} tokens "
            f"(valid: -{n_tokens} … {n_tokens - 1})"
        )
    means = _means(args, config, llm)
    report = faithfulness(
        llm,
        prompt,
        threshold=threshold,
        renormalize=not args.no_renormalize,
        target=args.target,
        distractor=args.distractor,
        position=args.position,
        mode=args.mode,
        means=means,
        seeds=tuple(range(args.seeds)),
    )
    ids = llm.tokenize(prompt)
    data = {
        "model": llm.info.name,
        "tokens": llm.token_strings(ids),
        "token_ids": ids,
        "mean_prompts": None if means is None else means.source,
    } | report.to_dict()
    _write(json.dumps(data), None)


def _dataset(args: argparse.Namespace) -> None:
    from llm_flow.analyses.dataset import dataset_frequencies, write_table
    from llm_flow.io.prompts import read_prompt_file

    threshold = _threshold(args.threshold)
    prompts = read_prompt_file(args.prompts)
    if args.out is not None and Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        raise LlmFlowError(f"--out must end in .csv or .parquet, got {args.out!r}")
    config, llm = _load(args)
    for prompt in prompts:
        _checked_prompt(config, prompt)
    say = _progress()

    def progress(done: int, total: int) -> None:
        if say is not None:
            say(f"prompt {done}/{total}")

    frame = dataset_frequencies(llm, prompts, threshold=threshold, on_prompt=progress)
    if args.out is None:
        _write(frame.to_csv(index=False).rstrip("\n"), None)
    else:
        write_table(frame, args.out)


COMMANDS = {
    "info": _info,
    "graph": _graph,
    "bench": _bench,
    "ablate": _ablate,
    "faithfulness": _faithfulness,
    "dataset": _dataset,
}


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
