"""The ``llm-flow`` command line: every sub-command's arguments (the contract is in
docs/architecture.md, "Command line"). Checking the values is the core's job
(:mod:`llm_flow.validate` and the analyses); this module only declares them.
"""

from __future__ import annotations

import argparse
import sys

from llm_flow.engine.routes import DEFAULT_THRESHOLD

EXIT_USAGE = 2
DEFAULT_MEAN_PROMPTS = "factual.txt"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"llm-flow: error: {message} (see {self.prog} -h)\n")
        raise SystemExit(EXIT_USAGE)


def _add_model_args(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--config", help="JSON config (default: the bundled config/local.json)")
    p.add_argument("--model", help="model name from the config (default: its default_model)")
    if device:
        p.add_argument(
            "--device",
            help="cpu or cuda (default: cpu); with --device-map, where contributions are "
            "computed (default: the device of the model's embedding)",
        )
        p.add_argument(
            "--device-map",
            help="split the model over several devices: auto, balanced, balanced_low_0, "
            "sequential, or a JSON object module name -> device (overrides the config entry's)",
        )
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


def _add_corpus_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``index`` (build a corpus index) and ``top`` (a unit's top examples from it)."""
    corpus_help = (
        "text (.txt, .txt.gz), JSONL ({'text': …} per line), a prompt file, a folder of them, "
        "or a Hugging Face dataset name (default: the shipped public-domain books)"
    )
    index = sub.add_parser("index", help="index a corpus: each unit's top examples")
    index.add_argument("--corpus", help=corpus_help)
    _add_model_args(index)
    index.add_argument("--layers", help="layers to index, e.g. 0,3,5-7 (default: all)")
    index.add_argument("--window", type=int, default=64, help="tokens per window (64)")
    index.add_argument("--k", type=int, default=20, help="examples kept per unit (20)")
    index.add_argument("--max-tokens", type=int, help="index at most this many tokens")

    top = sub.add_parser("top", help="a neuron's, head's or expert's top corpus examples")
    unit = top.add_mutually_exclusive_group(required=True)
    unit.add_argument("--neuron", help="LAYER.NEURON, e.g. 5.120")
    unit.add_argument("--head", help="LAYER.HEAD, e.g. 9.3")
    unit.add_argument("--expert", help="LAYER.EXPERT of a mixture-of-experts layer, e.g. 3.1")
    top.add_argument("--k", type=int, default=20, help="examples to print (20)")
    top.add_argument("--corpus", help="the corpus the index was built on (default: the shipped)")
    _add_model_args(top)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-flow", description="Information-flow routes of transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="print model info as JSON")
    _add_model_args(info)

    graph = sub.add_parser("graph", help="contribution graph / route of a prompt")
    graph.add_argument("--prompt", required=True, help="the text to analyse")
    _add_model_args(graph)
    graph.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"τ in [0, 1] ({DEFAULT_THRESHOLD})",
    )
    graph.add_argument("--position", type=int, default=-1, help="output position (-1: last)")
    graph.add_argument("--no-renormalize", action="store_true", help="keep raw edge weights")
    graph.add_argument("--heads", action="store_true", help="per-head weights on attention edges")
    graph.add_argument("--format", choices=("json", "graphml"), default="json")
    graph.add_argument("--out", help="write here instead of stdout")
    _add_contrast_args(graph)

    ablate = sub.add_parser("ablate", help="zero- or mean-ablate heads, neurons, experts or edges")
    ablate.add_argument("--prompt", required=True, help="the text to analyse")
    _add_model_args(ablate)
    ablate.add_argument("--heads", default="", help="LAYER.HEAD[,…], e.g. 9.3,10.7")
    ablate.add_argument("--neurons", default="", help="LAYER.NEURON[,…], e.g. 5.120")
    ablate.add_argument(
        "--experts", default="", help="LAYER.EXPERT[,…] of mixture-of-experts layers, e.g. 3.1"
    )
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
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"τ of the --graph-diff routes ({DEFAULT_THRESHOLD})",
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
    faith.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"τ in [0, 1] ({DEFAULT_THRESHOLD})",
    )
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
    dataset.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"τ in [0, 1] ({DEFAULT_THRESHOLD})",
    )
    dataset.add_argument("--out", help="RESULTS.csv or RESULTS.parquet (default: CSV to stdout)")

    _add_corpus_commands(sub)

    bench = sub.add_parser("bench", help="time forward / graph / routes and measure memory")
    _add_model_args(bench)
    bench.add_argument("--tokens", default="64,256,1024", help="comma-separated token counts")
    bench.add_argument(
        "--heads",
        action="store_true",
        help="also time the per-head contributions of every query of the middle layer",
    )
    bench.add_argument("--json", action="store_true", help="machine-readable output")

    app = sub.add_parser(
        "app",
        help="start the explorer (Streamlit) from any folder",
        description="Start the Streamlit explorer. Every other option goes to `streamlit run`, "
        "e.g. --server.port 8600 --server.headless true (see streamlit run --help).",
        usage="llm-flow app [-h] [--config PATH] [streamlit options …]",
    )
    app.add_argument(
        "--config", metavar="PATH", help="JSON config (default: the bundled config/local.json)"
    )
    return parser
