"""The ``llm-flow`` command line: every sub-command's arguments (the contract is in
docs/architecture.md, "Command line"). Checking the values is the core's job
(:mod:`llm_flow.validate` and the analyses); this module only declares them.
"""

from __future__ import annotations

import argparse
import sys

from llm_flow.engine.routes import DEFAULT_THRESHOLD

EXIT_USAGE = 2
# llm_flow.distributed's LOCAL and DEFAULT_CPU_WORKERS (that module imports ray's helpers: it is
# imported only when --ray is given); tests/unit/cli/test_ray_cli.py checks they agree.
RAY_LOCAL = "local"
RAY_CPU_WORKERS = 2
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


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const=RAY_LOCAL,
        metavar="ADDRESS",
        help="run as a Ray job on the cluster at ADDRESS (HOST:PORT, or auto); without ADDRESS "
        "on a local cluster started for the job (needs: pip install 'llm-flow[ray]')",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="--ray: workers, each holding the model once (default: one per GPU of the cluster "
        f"with --device cuda, else {RAY_CPU_WORKERS} sharing the cluster's CPUs)",
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
    index.add_argument(
        "--sae",
        action="append",
        help="index an SAE's latents too (repeatable): a hook such as blocks.3.hook_resid_post "
        "(the model's SAE there: its config entry or the trained one), or an SAE folder, "
        "params.npz or hub repo; with --sae and no --layers only latents are indexed",
    )
    _add_ray_args(index)

    top = sub.add_parser("top", help="a neuron's, head's, expert's or latent's top examples")
    unit = top.add_mutually_exclusive_group(required=True)
    unit.add_argument("--neuron", help="LAYER.NEURON, e.g. 5.120")
    unit.add_argument("--head", help="LAYER.HEAD, e.g. 9.3")
    unit.add_argument("--expert", help="LAYER.EXPERT of a mixture-of-experts layer, e.g. 3.1")
    unit.add_argument(
        "--latent", help="HOOK:INDEX of an SAE latent, e.g. blocks.3.hook_resid_post:12"
    )
    top.add_argument("--k", type=int, default=20, help="examples to print (20)")
    top.add_argument("--corpus", help="the corpus the index was built on (default: the shipped)")
    top.add_argument(
        "--sae", help="--latent: an SAE folder, params.npz or hub repo not in the config"
    )
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
    ablate.add_argument(
        "--latents",
        default="",
        help="SAE latents HOOK:I[,…], e.g. blocks.3.hook_resid_post:12,40 (the model's SAE on "
        "that hook, or --sae)",
    )
    ablate.add_argument(
        "--scale", type=float, default=0.0, help="--latents: multiply their parts by X (0)"
    )
    ablate.add_argument("--sae", help="--latents: an SAE folder or params.npz not in the config")
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

    attend = sub.add_parser(
        "attend", help="why a head attends from one token to another: its score split (QK)"
    )
    attend.add_argument("--prompt", required=True, help="the text to analyse")
    _add_model_args(attend)
    attend.add_argument("--layer", type=int, required=True, help="the attention layer")
    attend.add_argument("--head", type=int, required=True, help="the query head")
    attend.add_argument(
        "--query", type=int, required=True, help="query position (negative: from the end)"
    )
    attend.add_argument(
        "--source", type=int, required=True, help="source position ≤ query (negative: from the end)"
    )
    attend.add_argument("--top", type=int, default=20, help="terms listed per table (20)")
    attend.add_argument(
        "--experts",
        action="store_true",
        help="split mixture-of-experts FFN blocks into their experts (M4_5.e7, M4_5.shared)",
    )

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
    _add_ray_args(dataset)

    _add_corpus_commands(sub)

    bench = sub.add_parser("bench", help="time forward / graph / routes and measure memory")
    _add_model_args(bench)
    bench.add_argument("--tokens", default="64,256,1024", help="comma-separated token counts")
    bench.add_argument(
        "--heads",
        action="store_true",
        help="also time the per-head contributions of every query of the middle layer",
    )
    bench.add_argument(
        "--dataset",
        action="store_true",
        help="instead: dataset mode's prompts / s in-process and as Ray jobs of 1 and 2 workers",
    )
    bench.add_argument(
        "--ray",
        default=RAY_LOCAL,
        metavar="ADDRESS",
        help="--dataset: the Ray cluster (default: a local one started for each run)",
    )
    bench.add_argument("--json", action="store_true", help="machine-readable output")

    _add_sae_parsers(sub)

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


def _add_sae_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``latents`` and ``sae train`` (sparse autoencoders on the residual stream)."""
    latents = sub.add_parser(
        "latents", help="a residual node, or an attention edge, as SAE latents (JSON)"
    )
    latents.add_argument("--prompt", required=True, help="the text to analyse")
    where = latents.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", help="residual node: I{l}_t, A{l}_t or X0_t")
    where.add_argument(
        "--edge", help="attention edge I{l-1}_s->A{l}_t or X0_s->A0_t: its source's latents"
    )
    _add_model_args(latents)
    latents.add_argument("--top", type=int, default=20, help="latents listed (20)")
    latents.add_argument("--sae", help="an SAE folder, params.npz or hub repo not in the config")
    _add_contrast_args(latents)

    sae = sub.add_parser("sae", help="sparse autoencoders: train one on the residual stream")
    commands = sae.add_subparsers(dest="sae_command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train a small SAE on blocks.L.hook_resid_post (CPU)",
        description="Train a top-k (or, with --l1, a standard ReLU + L1) SAE on the residual "
        "after layer L over a text corpus and save it in SAELens's folder format under the "
        "cache dir, where `llm-flow latents` finds it.",
    )
    train.add_argument("--layer", type=int, required=True, help="the residual after layer L")
    _add_model_args(train)
    train.add_argument(
        "--corpus",
        help="a text, .txt.gz or JSONL file, a folder of them, or a dataset name "
        "(default: the shipped public-domain corpus)",
    )
    train.add_argument("--d-sae", type=int, default=4096, help="number of latents (4096)")
    train.add_argument("--k", type=int, default=32, help="active latents per token, top-k (32)")
    train.add_argument("--l1", type=float, help="train a standard SAE with this L1 coefficient")
    train.add_argument("--steps", type=int, default=2000, help="Adam steps (2000)")
    train.add_argument("--batch-size", type=int, default=1024, help="tokens per step (1024)")
    train.add_argument("--max-tokens", type=int, default=32768, help="activations kept (32768)")
    train.add_argument("--out", help="folder to save to (default: <cache>/saes/<model>/<hook>)")
