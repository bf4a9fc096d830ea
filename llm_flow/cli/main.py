"""``llm-flow``: the engine without the app (contract in docs/architecture.md, "Command line").

Each command turns its arguments into core calls and prints the result; checking values is the
core's job, so an error here is whatever :class:`~llm_flow.errors.LlmFlowError` the core raised,
printed as one stderr line with exit code 2. Results go to stdout (or ``--out``); progress goes
to stderr only when it is a terminal.
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

from llm_flow.cli.common import (
    check_pair,
    check_ray_args,
    config_arg,
    load_llm,
    prompt_header,
    ray_job,
    sae_arg,
    stderr_progress,
    write_out,
)
from llm_flow.cli.parser import DEFAULT_MEAN_PROMPTS, EXIT_USAGE, build_parser
from llm_flow.cli.units import index_command, latents_command, sae_command, top_command
from llm_flow.config import AppConfig
from llm_flow.errors import InputError, LlmFlowError
from llm_flow.validate import check_at_least, check_threshold

if TYPE_CHECKING:
    from llm_flow.analyses.interventions import MeanActivations
    from llm_flow.engine.trace import Trace
    from llm_flow.models.sae import Sae


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


def _trace(
    args: argparse.Namespace,
    config: AppConfig,
    *,
    keep_patterns: bool | None = None,
    checks: Callable[[], None] = lambda: None,
) -> Trace:
    """Check the prompt (and ``checks``) before loading the model, then trace the prompt, storing
    the attention edges that routes at ``args.threshold`` need (all of them at τ = 0)."""
    from llm_flow.engine.graph import exact_floor
    from llm_flow.engine.trace import trace

    config.check_prompt(args.prompt)
    checks()
    floor = exact_floor(args.threshold)
    return trace(
        load_llm(args, config), args.prompt, keep_patterns=keep_patterns, attention_floor=floor
    )


def _info(args: argparse.Namespace) -> None:
    llm = load_llm(args, config_arg(args.config))
    write_out(json.dumps(llm.info.to_dict(), indent=2), None)


def _graph(args: argparse.Namespace) -> None:
    from llm_flow.engine.routes import find_route, full_graph
    from llm_flow.io.export import graph_json, to_graphml

    def checks() -> None:
        check_threshold(args.threshold)
        check_pair(args)

    want_contrast = args.target is not None
    tr = _trace(args, config_arg(args.config), checks=checks)
    position = tr.position(args.position)
    renormalize = not args.no_renormalize
    if args.threshold == 0 and not renormalize:
        route = full_graph(tr.graph)
    else:
        route = find_route(tr.graph, [position], args.threshold, renormalize)
    pair = direct = None
    if want_contrast:
        from llm_flow.analyses.contrast import contrast, direct_effects

        pair = contrast(tr, args.target, args.distractor, position)
        direct = direct_effects(tr, pair)
    data = graph_json(tr, route, position=position, heads=args.heads, contrast=pair, direct=direct)
    text = json.dumps(data) if args.format == "json" else to_graphml(data)
    write_out(text, args.out)


def _bench(args: argparse.Namespace) -> None:
    if args.dataset:
        from llm_flow.cli.bench_dataset import dataset_bench_command

        dataset_bench_command(args)
        return
    from llm_flow.cli.bench import bench, format_table, parse_token_counts

    counts = parse_token_counts(args.tokens)
    llm = load_llm(args, config_arg(args.config))
    rows = bench(llm, counts, heads=args.heads, progress=stderr_progress())
    if args.json:
        write_out(json.dumps([r.to_dict() for r in rows], indent=2), None)
    else:
        write_out(
            f"{llm.info.name} on {llm.info.device} ({llm.info.dtype})\n" + format_table(rows), None
        )


def _means(args: argparse.Namespace, config: AppConfig, tr: Trace) -> MeanActivations | None:
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
        raise InputError(
            f"mean ablation needs reference prompts: pass --mean-prompts FILE (there is no "
            f"{DEFAULT_MEAN_PROMPTS} in the config's prompts_dir), or use --mode zero"
        )
    return mean_activations(tr.llm, read_prompt_file(path), source=str(path))


def _ablate(args: argparse.Namespace) -> None:
    from llm_flow.analyses.ablation import ablate
    from llm_flow.analyses.contrast import contrast_ids
    from llm_flow.analyses.interventions import (
        Ablation,
        parse_edges,
        parse_experts,
        parse_heads,
        parse_neurons,
        validate,
    )

    latents = _latent_edit(args)
    ablation = Ablation(
        heads=parse_heads(args.heads),
        neurons=parse_neurons(args.neurons),
        edges=parse_edges(args.edges),
        mode=args.mode,
        experts=parse_experts(args.experts),
    )

    def checks() -> None:
        check_pair(args)
        if ablation.is_empty and latents is None:
            raise InputError(
                "nothing to ablate; pass --heads, --neurons, --experts, --edges and/or --latents"
            )
        check_at_least("--top", args.top, 1)
        check_threshold(args.threshold)

    config = config_arg(args.config)
    tr = _trace(args, config, keep_patterns=False, checks=checks)
    tr.position(args.position)
    validate(ablation, tr.llm.info, tr.n_tokens)  # before the mean pass: report bad ids at once
    a = b = None
    if args.target is not None:
        a, b = contrast_ids(tr.llm, args.target, args.distractor)
    hooks = []
    if latents is not None:
        from llm_flow.analyses.latents import latent_hooks

        hooks = latent_hooks(tr.llm, _sae(args, config, latents[0]), latents[1], args.scale)
    result = ablate(
        tr,
        ablation,
        hooks=hooks,
        means=_means(args, config, tr),
        target_id=a,
        distractor_id=b,
        position=args.position,
        k=args.top,
        traced=args.graph_diff,
    )
    data = prompt_header(tr) | {"target": args.target, "distractor": args.distractor}
    data |= result.to_dict()
    if latents is not None:
        data["ablated"]["latents"] = {
            "hook": latents[0],
            "indices": list(latents[1]),
            "scale": args.scale,
        }
    if args.graph_diff:
        data["graph_diff"] = result.route_diff(args.threshold, not args.no_renormalize).to_dict()
    write_out(json.dumps(data), None)


def _faithfulness(args: argparse.Namespace) -> None:
    from llm_flow.analyses.faithfulness import faithfulness

    def checks() -> None:
        check_threshold(args.threshold)
        check_at_least("--seeds", args.seeds, 1)
        if args.distractor is not None and args.target is None:
            raise InputError("--distractor needs --target too (or pass only --target)")

    config = config_arg(args.config)
    tr = _trace(args, config, checks=checks)
    tr.position(args.position)
    means = _means(args, config, tr)
    report = faithfulness(
        tr,
        threshold=args.threshold,
        renormalize=not args.no_renormalize,
        target=args.target,
        distractor=args.distractor,
        position=args.position,
        mode=args.mode,
        means=means,
        seeds=tuple(range(args.seeds)),
    )
    data = prompt_header(tr) | {"mean_prompts": None if means is None else means.source}
    write_out(json.dumps(data | report.to_dict()), None)


def _attend(args: argparse.Namespace) -> None:
    from llm_flow.analyses.attend import attend
    from llm_flow.engine.graph import ATTENTION_FLOOR
    from llm_flow.engine.trace import trace

    config = config_arg(args.config)
    config.check_prompt(args.prompt)
    check_at_least("--top", args.top, 1)
    # No route is asked for: the graph stores only the edges ≥ the default floor.
    tr = trace(load_llm(args, config), args.prompt, attention_floor=ATTENTION_FLOOR)
    result = attend(
        tr, args.layer, args.head, args.query, args.source, top=args.top, experts=args.experts
    )
    write_out(json.dumps(prompt_header(tr) | result.to_json()), None)


def _dataset(args: argparse.Namespace) -> None:
    from llm_flow.analyses.dataset import check_dataset, check_table_path, write_table
    from llm_flow.io.prompts import read_prompt_file

    check_ray_args(args)
    prompts = read_prompt_file(args.prompts)
    check_dataset(prompts, args.threshold)
    if args.out is not None:
        check_table_path(args.out)
    config = config_arg(args.config)
    for prompt in prompts:
        config.check_prompt(prompt)
    say = stderr_progress()

    def progress(done: int, total: int) -> None:
        if say is not None:
            say(f"prompt {done}/{total}")

    if args.ray is not None:
        from llm_flow.distributed import ray_dataset

        recipe, options = ray_job(args, config)
        frame = ray_dataset(
            recipe, prompts, threshold=args.threshold, options=options, on_prompt=progress
        )
    else:
        from llm_flow.analyses.dataset import dataset_frequencies

        llm = load_llm(args, config)
        frame = dataset_frequencies(llm, prompts, threshold=args.threshold, on_prompt=progress)
    if args.out is None:
        write_out(frame.to_csv(index=False).rstrip("\n"), None)
    else:
        write_table(frame, args.out)


def _latent_edit(args: argparse.Namespace) -> tuple[str, tuple[int, ...]] | None:
    """``ablate --latents HOOK:I,…`` parsed, or None."""
    if not args.latents:
        if args.sae is not None:
            raise InputError("--sae goes with --latents; name the latents to ablate")
        return None
    from llm_flow.analyses.latents import parse_latents

    return parse_latents(args.latents)


def _sae(args: argparse.Namespace, config: AppConfig, hook: str) -> Sae:
    """The SAE on ``hook`` (:func:`~llm_flow.cli.common.sae_arg`)."""
    from llm_flow.engine.nodes import parse_node
    from llm_flow.models.sae import node_of_hook

    node = parse_node(node_of_hook(hook, 0))
    assert node is not None  # node_of_hook spells valid node ids
    return sae_arg(args, config, node.kind, node.layer, hook)


def _app(args: argparse.Namespace) -> None:
    from llm_flow.cli import launch

    code = launch.run(launch.command(args.config, args.streamlit_options))
    if code:
        raise SystemExit(code)


COMMANDS = {
    "info": _info,
    "graph": _graph,
    "bench": _bench,
    "ablate": _ablate,
    "faithfulness": _faithfulness,
    "attend": _attend,
    "dataset": _dataset,
    "latents": latents_command,
    "sae": sae_command,
    "index": index_command,
    "top": top_command,
    "app": _app,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "app":  # the options llm-flow does not know are streamlit's
        args.streamlit_options = extra
    elif extra:
        parser.parse_args(argv)  # argparse's own one-line error, exit 2
    if args.command != "app":  # the server is another program, with its own logging
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
