"""The ``llm-flow`` commands about single units and their corpora: ``latents`` (an SAE's latents
at a residual node), ``sae train``, ``index`` (the corpus index) and ``top`` (a unit's top
examples)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

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
from llm_flow.validate import check_at_least

SAE_WINDOW = 128  # tokens per context the SAE's training residuals are read in


def latents_command(args: argparse.Namespace) -> None:
    from llm_flow.analyses.latents import latents
    from llm_flow.analyses.lens import parse_node
    from llm_flow.engine.trace import trace

    config = config_arg(args.config)
    config.check_prompt(args.prompt)
    check_at_least("--top", args.top, 1)
    check_pair(args)
    llm = load_llm(args, config)
    tr = trace(llm, args.prompt)
    node = parse_node(args.node, tr.n_layers, tr.n_tokens)
    sae = sae_arg(args, config, node.kind, node.layer)  # latents() checks it reads the node
    result = latents(
        tr, args.node, sae, top=args.top, target=args.target, distractor=args.distractor
    )
    write_out(json.dumps(prompt_header(tr) | result.to_json()), None)


def sae_command(args: argparse.Namespace) -> None:
    """``llm-flow sae train``: the only ``sae`` command so far."""
    from llm_flow.io.corpus import open_corpus, token_windows
    from llm_flow.models.sae import save_sae, trained_sae_dir
    from llm_flow.models.sae_training import train_sae

    corpus = open_corpus(args.corpus)
    config = config_arg(args.config)
    llm = load_llm(args, config)
    bar = progress_bar()
    trained = train_sae(
        llm,
        args.layer,
        (w.token_ids for w in token_windows(llm, corpus, SAE_WINDOW)),
        d_sae=args.d_sae,
        k=args.k,
        architecture="topk" if args.l1 is None else "standard",
        l1=0.0 if args.l1 is None else args.l1,
        steps=args.steps,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        progress=bar,
    )
    spec = config.model(args.model or config.default_model)
    hook = f"blocks.{args.layer}.hook_resid_post"
    out = Path(args.out) if args.out else trained_sae_dir(spec.name, hook)
    save_sae(trained.sae, out, model_name=spec.name)
    write_out(json.dumps(trained.to_dict() | {"model": spec.name, "path": str(out)}), None)


def progress_bar() -> Callable[[str, int, int], None] | None:
    """A one-line progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return None

    def draw(phase: str, done: int, total: int) -> None:
        filled = 30 * done // max(total, 1)
        end = "\n" if done == total else ""
        sys.stderr.write(f"\rllm-flow: {phase:<11} [{'#' * filled:<30}] {done}/{total}{end}")
        sys.stderr.flush()

    return draw


def index_command(args: argparse.Namespace) -> None:
    from llm_flow.analyses.corpus_index import parse_layers
    from llm_flow.io.corpus import open_corpus

    check_ray_args(args)
    layers = None if args.layers is None else parse_layers(args.layers)
    check_at_least("--window", args.window, 2)
    check_at_least("--k", args.k, 1)
    corpus = open_corpus(args.corpus)
    config = config_arg(args.config)
    say = stderr_progress()
    total = "" if args.max_tokens is None else f"/{-(-args.max_tokens // args.window)}"

    def progress(windows: int, tokens: int) -> None:
        if say is not None:
            say(f"indexed {windows}{total} windows, {tokens} tokens")

    if args.ray is not None:
        from llm_flow.distributed import ray_index

        recipe, options = ray_job(args, config)
        index = ray_index(
            recipe,
            corpus,
            layers=layers,
            window=args.window,
            k=args.k,
            max_tokens=args.max_tokens,
            options=options,
            progress=progress,
        )
    else:
        from llm_flow.io.index_store import build_index

        index = build_index(
            load_llm(args, config),
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
    write_out(json.dumps(summary), None)


def top_command(args: argparse.Namespace) -> None:
    from llm_flow.analyses.top_examples import check_unit, parse_unit, unit_report
    from llm_flow.errors import IndexNotFoundError
    from llm_flow.io.corpus import open_corpus
    from llm_flow.io.index_store import find_index

    check_at_least("--k", args.k, 1)
    kind = next(k for k in ("neuron", "head", "expert") if getattr(args, k) is not None)
    layer, unit = parse_unit(getattr(args, kind), kind)
    corpus = open_corpus(args.corpus)
    llm = load_llm(args, config_arg(args.config))
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
    write_out(json.dumps(data), None)
