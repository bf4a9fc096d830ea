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
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_flow.cli.parser import DEFAULT_MEAN_PROMPTS, EXIT_USAGE, build_parser
from llm_flow.config import AppConfig, default_config, load_config
from llm_flow.errors import InputError, LlmFlowError
from llm_flow.placement import DeviceMap, parse_device_map
from llm_flow.validate import check_at_least, check_threshold

if TYPE_CHECKING:
    from llm_flow.analyses.interventions import MeanActivations
    from llm_flow.engine.trace import Trace
    from llm_flow.models import BridgeLlm


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


def _load(args: argparse.Namespace, config: AppConfig) -> BridgeLlm:
    from llm_flow.models import load_model

    spec = config.model(args.model or config.default_model)
    if args.device_map is not None:
        spec = replace(spec, device_map=_device_map(args.device_map))
    return load_model(spec, device=args.device, dtype=args.dtype, progress=_progress())


def _device_map(text: str) -> DeviceMap:
    """``--device-map``: a strategy name, or a JSON object module name → device."""
    value: Any = text
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"--device-map is not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
    parsed = parse_device_map(value, "--device-map")
    assert parsed is not None  # a string or an object is never None
    return parsed


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
        _load(args, config), args.prompt, keep_patterns=keep_patterns, attention_floor=floor
    )


def _write(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text + "\n")
        return
    try:
        Path(out).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise LlmFlowError(f"cannot write --out {out}: {exc.strerror}") from exc


def _contrast_pair(args: argparse.Namespace) -> None:
    if (args.target is None) != (args.distractor is None):
        raise InputError("--target and --distractor go together; pass both or neither")


def _prompt_header(tr: Trace) -> dict[str, Any]:
    return {"model": tr.llm.info.name, "tokens": list(tr.tokens), "token_ids": list(tr.token_ids)}


def _info(args: argparse.Namespace) -> None:
    llm = _load(args, _config(args.config))
    _write(json.dumps(llm.info.to_dict(), indent=2), None)


def _graph(args: argparse.Namespace) -> None:
    from llm_flow.engine.routes import find_route, full_graph
    from llm_flow.io.export import graph_json, to_graphml

    def checks() -> None:
        check_threshold(args.threshold)
        _contrast_pair(args)

    want_contrast = args.target is not None
    tr = _trace(args, _config(args.config), checks=checks)
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
    _write(text, args.out)


def _bench(args: argparse.Namespace) -> None:
    from llm_flow.cli.bench import bench, format_table, parse_token_counts

    counts = parse_token_counts(args.tokens)
    llm = _load(args, _config(args.config))
    rows = bench(llm, counts, heads=args.heads, progress=_progress())
    if args.json:
        _write(json.dumps([r.to_dict() for r in rows], indent=2), None)
    else:
        _write(
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

    ablation = Ablation(
        heads=parse_heads(args.heads),
        neurons=parse_neurons(args.neurons),
        edges=parse_edges(args.edges),
        mode=args.mode,
        experts=parse_experts(args.experts),
    )

    def checks() -> None:
        _contrast_pair(args)
        if ablation.is_empty:
            raise InputError("nothing to ablate; pass --heads, --neurons, --experts and/or --edges")
        check_at_least("--top", args.top, 1)
        check_threshold(args.threshold)

    config = _config(args.config)
    tr = _trace(args, config, keep_patterns=False, checks=checks)
    tr.position(args.position)
    validate(ablation, tr.llm.info, tr.n_tokens)  # before the mean pass: report bad ids at once
    a = b = None
    if args.target is not None:
        a, b = contrast_ids(tr.llm, args.target, args.distractor)
    result = ablate(
        tr,
        ablation,
        means=_means(args, config, tr),
        target_id=a,
        distractor_id=b,
        position=args.position,
        k=args.top,
        traced=args.graph_diff,
    )
    data = _prompt_header(tr) | {"target": args.target, "distractor": args.distractor}
    data |= result.to_dict()
    if args.graph_diff:
        data["graph_diff"] = result.route_diff(args.threshold, not args.no_renormalize).to_dict()
    _write(json.dumps(data), None)


def _faithfulness(args: argparse.Namespace) -> None:
    from llm_flow.analyses.faithfulness import faithfulness

    def checks() -> None:
        check_threshold(args.threshold)
        check_at_least("--seeds", args.seeds, 1)
        if args.distractor is not None and args.target is None:
            raise InputError("--distractor needs --target too (or pass only --target)")

    config = _config(args.config)
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
    data = _prompt_header(tr) | {"mean_prompts": None if means is None else means.source}
    _write(json.dumps(data | report.to_dict()), None)


def _dataset(args: argparse.Namespace) -> None:
    from llm_flow.analyses.dataset import check_table_path, dataset_frequencies, write_table
    from llm_flow.io.prompts import read_prompt_file

    check_threshold(args.threshold)
    prompts = read_prompt_file(args.prompts)
    if args.out is not None:
        check_table_path(args.out)
    config = _config(args.config)
    for prompt in prompts:
        config.check_prompt(prompt)
    llm = _load(args, config)
    say = _progress()

    def progress(done: int, total: int) -> None:
        if say is not None:
            say(f"prompt {done}/{total}")

    frame = dataset_frequencies(llm, prompts, threshold=args.threshold, on_prompt=progress)
    if args.out is None:
        _write(frame.to_csv(index=False).rstrip("\n"), None)
    else:
        write_table(frame, args.out)


def _index(args: argparse.Namespace) -> None:
    from llm_flow.analyses.corpus_index import parse_layers
    from llm_flow.io.corpus import open_corpus
    from llm_flow.io.index_store import build_index

    layers = None if args.layers is None else parse_layers(args.layers)
    check_at_least("--window", args.window, 2)
    check_at_least("--k", args.k, 1)
    corpus = open_corpus(args.corpus)
    llm = _load(args, _config(args.config))
    say = _progress()
    total = "" if args.max_tokens is None else f"/{-(-args.max_tokens // args.window)}"

    def progress(windows: int, tokens: int) -> None:
        if say is not None:
            say(f"indexed {windows}{total} windows, {tokens} tokens")

    index = build_index(
        llm,
        corpus,
        layers=layers,
        window=args.window,
        k=args.k,
        max_tokens=args.max_tokens,
        progress=progress,
    )
    summary = {
        "index": str(index.path),
        "model": index.settings.model,
        "corpus": index.settings.corpus,
        "layers": list(index.settings.layers),
        "window": index.settings.window,
        "k": index.settings.k,
        "windows": index.n_windows,
        "tokens": index.n_tokens,
        "units": index.units(),
    }
    _write(json.dumps(summary), None)


def _top(args: argparse.Namespace) -> None:
    from llm_flow.analyses.top_examples import check_unit, parse_unit, unit_report
    from llm_flow.errors import IndexNotFoundError
    from llm_flow.io.corpus import open_corpus
    from llm_flow.io.index_store import find_index

    check_at_least("--k", args.k, 1)
    kind = next(k for k in ("neuron", "head", "expert") if getattr(args, k) is not None)
    layer, unit = parse_unit(getattr(args, kind), kind)
    corpus = open_corpus(args.corpus)
    llm = _load(args, _config(args.config))
    checked = check_unit(llm, kind, layer, unit)
    try:
        index = find_index(llm, corpus, checked, layer)
    except IndexNotFoundError as exc:
        build = ["llm-flow index", f"--layers {layer}"]
        build += [
            f"--{n} {shlex.quote(getattr(args, n))}"
            for n in ("corpus", "model", "config")
            if getattr(args, n)
        ]
        if args.dtype != "float32":  # the index is keyed by the model's dtype too
            build.append(f"--dtype {args.dtype}")
        raise IndexNotFoundError(f"{exc}; build it with: {' '.join(build)}") from None
    data = unit_report(llm, index, checked, layer, unit, args.k).to_dict()
    _write(json.dumps(data), None)


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
    "dataset": _dataset,
    "index": _index,
    "top": _top,
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
