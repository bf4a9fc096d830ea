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
from typing import TYPE_CHECKING, Any

from llm_flow.cli.common import (
    check_pair,
    check_ray_args,
    config_arg,
    hook_sae,
    load_llm,
    prompt_header,
    ray_job,
    sae_arg,
    stderr_progress,
    write_out,
)
from llm_flow.errors import InputError
from llm_flow.validate import check_at_least

if TYPE_CHECKING:
    from llm_flow.config import AppConfig
    from llm_flow.engine.trace import Trace
    from llm_flow.models.sae import Sae

SAE_WINDOW = 128  # tokens per context the SAE's training residuals are read in


def latents_command(args: argparse.Namespace) -> None:
    from llm_flow.analyses.latents import latents
    from llm_flow.analyses.lens import parse_node
    from llm_flow.engine.trace import trace

    config = config_arg(args.config)
    config.check_prompt(args.prompt)
    check_at_least("--top", args.top, 1)
    check_pair(args)
    if args.edge is not None and args.target is not None:
        raise InputError("--target and --distractor go with --node; an edge has no direct effect")
    llm = load_llm(args, config)
    tr = trace(llm, args.prompt)
    if args.edge is not None:
        _edge_latents(args, config, tr)
        return
    node = parse_node(args.node, tr.n_layers, tr.n_tokens)
    sae = sae_arg(args, config, node.kind, node.layer)  # latents() checks it reads the node
    result = latents(
        tr, args.node, sae, top=args.top, target=args.target, distractor=args.distractor
    )
    write_out(json.dumps(prompt_header(tr) | result.to_json()), None)


def _edge_latents(args: argparse.Namespace, config: AppConfig, tr: Trace) -> None:
    """``latents --edge``: the edge's part over the SAE latents of its source node."""
    from llm_flow.analyses.edge_latents import edge_latents, parse_edge
    from llm_flow.engine.nodes import parse_node, source_id

    layer, _, source = parse_edge(args.edge, tr.n_layers, tr.n_tokens)
    node = parse_node(source_id(layer, source))
    assert node is not None  # source_id names a node
    sae = sae_arg(args, config, node.kind, node.layer)  # edge_latents checks it reads the node
    result = edge_latents(tr, args.edge, sae, top=args.top)
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
    saes = [_index_sae(args, config, value) for value in args.sae or []]
    say = stderr_progress()
    total = "" if args.max_tokens is None else f"/{-(-args.max_tokens // args.window)}"

    def progress(windows: int, tokens: int) -> None:
        if say is not None:
            say(f"indexed {windows}{total} windows, {tokens} tokens")

    settings: dict[str, Any] = {
        "layers": layers,
        "window": args.window,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "progress": progress,
        "saes": saes,
    }
    if args.ray is not None:
        from llm_flow.distributed import ray_index

        recipe, options = ray_job(args, config)
        index = ray_index(recipe, corpus, options=options, **settings)
    else:
        from llm_flow.io.index_store import build_index

        index = build_index(load_llm(args, config), corpus, **settings)
    summary = {
        "index": str(index.path),
        "model": index.settings.model,
        "corpus": index.settings.corpus,
        "layers": list(index.settings.layers),
        "saes": [
            {"hook": hook, "source": source, "fingerprint": fingerprint}
            for hook, source, fingerprint in index.settings.saes
        ],
        "window": index.settings.window,
        "k": index.settings.k,
        "windows": index.n_windows,
        "tokens": index.n_tokens,
        "units": index.units(),
    }
    write_out(json.dumps(summary), None)


def _index_sae(args: argparse.Namespace, config: AppConfig, value: str) -> Sae:
    """``index --sae VALUE``: the model's SAE on a hook name, else the SAE at a path or repo."""
    from llm_flow.models.sae import HOOK, load_sae

    return hook_sae(args, config, value, None) if HOOK.match(value) else load_sae(value)


def _top_latent(args: argparse.Namespace) -> None:
    """``top --latent HOOK:I``: the latent's examples from an index that covers its SAE."""
    from llm_flow.analyses.top_examples import latent_report, parse_latent
    from llm_flow.errors import IndexNotFoundError
    from llm_flow.io.corpus import open_corpus
    from llm_flow.io.index_store import find_latent_index

    hook, unit = parse_latent(args.latent)
    corpus = open_corpus(args.corpus)
    config = config_arg(args.config)
    llm = load_llm(args, config)
    sae = hook_sae(args, config, hook, args.sae)
    try:
        index, slot = find_latent_index(llm, corpus, sae)
    except IndexNotFoundError as exc:
        build = ["llm-flow index", f"--sae {shlex.quote(args.sae or hook)}"]
        build += _rebuild_args(args)
        raise IndexNotFoundError(f"{exc}; build it with: {' '.join(build)}") from None
    write_out(json.dumps(latent_report(llm, index, slot, unit, args.k).to_dict()), None)


def _rebuild_args(args: argparse.Namespace) -> list[str]:
    """The options of ``top`` an ``index`` command needs to build the index it looked for."""
    build = [
        f"--{n} {shlex.quote(getattr(args, n))}"
        for n in ("corpus", "model", "config")
        if getattr(args, n)
    ]
    if args.dtype != "float32":  # the index is keyed by the model's dtype too
        build.append(f"--dtype {args.dtype}")
    return build


def top_command(args: argparse.Namespace) -> None:
    from llm_flow.analyses.top_examples import check_unit, parse_unit, unit_report
    from llm_flow.errors import IndexNotFoundError
    from llm_flow.io.corpus import open_corpus
    from llm_flow.io.index_store import find_index

    check_at_least("--k", args.k, 1)
    if args.latent is not None:
        _top_latent(args)
        return
    if args.sae is not None:
        raise InputError("--sae goes with --latent")
    kind = next(k for k in ("neuron", "head", "expert") if getattr(args, k) is not None)
    layer, unit = parse_unit(getattr(args, kind), kind)
    corpus = open_corpus(args.corpus)
    llm = load_llm(args, config_arg(args.config))
    checked = check_unit(llm, kind, layer, unit)
    try:
        index = find_index(llm, corpus, checked, layer)
    except IndexNotFoundError as exc:
        build = ["llm-flow index", f"--layers {layer}", *_rebuild_args(args)]
        raise IndexNotFoundError(f"{exc}; build it with: {' '.join(build)}") from None
    data = unit_report(llm, index, checked, layer, unit, args.k).to_dict()
    write_out(json.dumps(data), None)
