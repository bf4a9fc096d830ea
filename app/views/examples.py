"""A unit's "Top examples" from a corpus index (TDB's neuron viewer, for neurons, heads,
experts and SAE latents): the contexts where the unit is most active, the activating token
marked, with the activation, the unit's histogram over the corpus and the automatic summary (no
language model).

The index comes from ``llm-flow index`` or from the button here, which indexes the unit's layer
(or its SAE's latents) over a chosen corpus (the shipped public-domain books, or a prompt file of
the config's ``prompts_dir``) with a progress bar. A demo server builds nothing: its owner runs
the command.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from app import cache
from app.cache import CachedTrace
from app.figures import panels as panel_figures
from app.prompts import offered_files
from llm_flow.analyses.corpus_index import IndexProgress, Kind
from llm_flow.analyses.top_examples import Example, UnitReport
from llm_flow.config import AppConfig
from llm_flow.errors import IndexNotFoundError, LlmFlowError
from llm_flow.io.index_store import DEFAULT_WINDOW
from llm_flow.io.text import markdown_text

SHIPPED = "the shipped corpus (public-domain books)"
# Tokens a button press indexes (whole windows): ~0.4 s per 64-token window on a 2-core CPU.
BUILD_TOKENS = {"4,096 tokens": 4096, "16,384 tokens": 16384, "65,536 tokens": 65536, "all": None}
SHOWN = 10
AFTER_TOKENS = 4  # tokens shown after the activating one


def corpus_choices(cfg: AppConfig) -> list[str]:
    """The corpora a user may index here: the shipped one, then the config's prompt files."""
    return [SHIPPED, *offered_files(cfg)]


def _corpus_path(cfg: AppConfig, choice: str) -> Path | None:
    return None if choice == SHIPPED else cfg.prompt_file(choice)


def example_rows(
    decode: Callable[[Sequence[int]], str], examples: Sequence[Example]
) -> pd.DataFrame:
    """One row per example: the activation and the context, the activating token in ⟦ ⟧."""
    rows = []
    for e in examples:
        before = decode(e.token_ids[: e.position])
        after = decode(e.token_ids[e.position + 1 : e.position + 1 + AFTER_TOKENS])
        rows.append((e.activation, f"{before}⟦{decode([e.token_ids[e.position]])}⟧{after}"))
    return pd.DataFrame(rows, columns=["activation", "context"])


@dataclass(frozen=True)
class Unit:
    """What a "Top examples" section shows: ``report`` reads the unit's report from the index of
    a corpus (None: the shipped one; :class:`IndexNotFoundError` while there is none), ``build``
    indexes what the unit needs (at most so many tokens), ``what`` names that in the button
    ("layer 3") and ``command`` is the CLI's way to build it."""

    report: Callable[[Path | None], UnitReport]
    build: Callable[[Path | None, int | None, IndexProgress], None]
    what: str
    command: str


def layer_unit(cached: CachedTrace, kind: Kind, layer: int, unit: int) -> Unit:
    """Neuron, head or expert ``layer.unit`` of ``kind``: indexed with its whole layer."""
    llm = cached.trace.llm
    return Unit(
        report=lambda corpus: cache.unit_report(llm, corpus, kind, layer, unit),
        build=lambda corpus, limit, progress: cache.build_corpus_index(
            llm, corpus, layer, limit, progress
        ),
        what=f"layer {layer}",
        command=f"llm-flow index --layers {layer}",
    )


def top_examples_section(cfg: AppConfig, cached: CachedTrace, unit: Unit, key: str) -> None:
    """The examples of ``unit``, or how to build an index that has them."""
    llm = cached.trace.llm
    choices = corpus_choices(cfg)
    choice: str = st.selectbox("Corpus", choices, key=f"corpus|{key}")
    try:
        corpus = _corpus_path(cfg, choice)
        report = unit.report(corpus)
    except IndexNotFoundError as exc:
        _build(cfg, unit, corpus, str(exc), key)
        return
    except LlmFlowError as exc:
        st.warning(markdown_text(str(exc)))
        return
    st.markdown(markdown_text(report.explanation["text"]))
    st.dataframe(
        example_rows(llm.decode, report.examples[:SHOWN]),
        hide_index=True,
        width="stretch",
        column_config={"activation": st.column_config.NumberColumn(format="%.3f")},
    )
    histogram = report.histogram
    st.plotly_chart(
        panel_figures.histogram_figure(
            histogram["edges"], histogram["counts"], histogram["measure"]
        ),
        key=f"histogram|{key}",
        config=panel_figures.PLOTLY_CONFIG,
    )
    st.caption(
        f"The {min(SHOWN, len(report.examples))} largest of {report.histogram['measure']} over "
        f"the corpus (each a window of its text; the activating token in ⟦ ⟧), and how often each "
        "value occurs (log-spaced bins). The summary is automatic, from these examples."
    )


def _build(cfg: AppConfig, unit: Unit, corpus: Path | None, why: str, key: str) -> None:
    st.info(markdown_text(why) + ".")
    if cfg.demo_mode:
        st.caption(f"Indexes are built on this server by its owner: `{unit.command}`.")
        return
    size: str = st.selectbox("Index", list(BUILD_TOKENS), key=f"index_size|{key}")
    if not st.button(f"Build the index of {unit.what}", key=f"build_index|{key}"):
        return
    bar = st.progress(0.0, text="Indexing the corpus…")
    limit = BUILD_TOKENS[size]
    total = None if limit is None else -(-limit // DEFAULT_WINDOW)

    def progress(windows: int, tokens: int) -> None:
        done = windows / total if total else 0.0
        bar.progress(min(done, 1.0), text=f"Indexed {windows} windows, {tokens} tokens")

    try:
        unit.build(corpus, limit, progress)
    except LlmFlowError as exc:
        st.warning(markdown_text(str(exc)))
        return
    bar.empty()
    st.rerun()
