"""The sidebar: model, device and precision, prompts, the graph's settings, the output position
and the contrast's tokens. The threshold slider sits above the graph instead
(:func:`app.views.route.graph_controls`): a slider step reruns only the route view.

Every widget is created with a key from :mod:`app.session` and no default of its own: the
starting values come from ``session.init_session`` (which reads the URL), so there is one source
of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from app import session
from app.cache import CachedTrace, LoadedModel, ModelKey
from app.prompts import prompt_files
from app.views.errors import NeedsInput, show_error
from llm_flow.config import AppConfig, spec_from_name
from llm_flow.engine.routes import DEFAULT_THRESHOLD
from llm_flow.io.text import display_token

PROMPT_LABEL_CHARS = 70


@dataclass(frozen=True)
class GraphSettings:
    threshold: float
    renormalize: bool
    normalize_lens: bool


def model_controls(cfg: AppConfig) -> tuple[ModelKey, str]:
    """The chosen model (as a cache key) and its label for the URL.

    Raises ``ConfigError`` for a custom name that is neither a hub id nor a usable path, and
    :class:`NeedsInput` while the custom name is empty.
    """
    ss = st.session_state
    options = list(cfg.model_names())
    if not cfg.demo_mode:
        options.append(session.CUSTOM_CHOICE)
    if ss.get(session.MODEL) not in options:
        ss[session.MODEL] = cfg.default_model
    choice = st.selectbox("Model", options, key=session.MODEL)
    if choice == session.CUSTOM_CHOICE:
        text = st.text_input(
            "Hub id or local path",
            key=session.CUSTOM_MODEL,
            placeholder="gpt2 or /data/my-model or ~/m/model.gguf",
            help="A Hugging Face hub id, a folder with HF weights (config.json + "
            "*.safetensors) or a .gguf file. Press Enter to load it.",
        )
        if not text.strip():
            raise NeedsInput("Type a hub id or a local path for the custom model in the sidebar.")
        spec = spec_from_name(text, allow_paths=not cfg.demo_mode)
        label = text.strip()
    else:
        spec = cfg.model(choice)
        label = choice

    devices = session.devices()
    if ss.get(session.DEVICE) not in devices:
        ss[session.DEVICE] = session.DEFAULT_DEVICE
    left, right = st.columns(2)
    device = left.selectbox(
        "Device", devices, key=session.DEVICE, help="cuda is listed when a GPU is available"
    )
    dtype = right.selectbox(
        "Precision",
        session.DTYPES,
        key=session.DTYPE,
        help="The model's weights and activations. float16 and bfloat16 halve the memory (on "
        "a CPU they are usually slower). Contributions always accumulate in float32.",
    )
    return ModelKey(spec, device, dtype), label


def model_info(model: LoadedModel) -> None:
    info = model.llm.info.to_dict()
    with st.expander("Model info"):
        rows = [(k.replace("_", " "), str(v)) for k, v in info.items()]
        rows.append(("load time", f"{model.load_seconds:.1f} s"))
        st.dataframe(
            pd.DataFrame(rows, columns=["property", "value"]),
            hide_index=True,
            width="stretch",
        )


def _prompt_label(prompt: str) -> str:
    text = display_token(prompt)
    return text if len(text) <= PROMPT_LABEL_CHARS else text[: PROMPT_LABEL_CHARS - 1] + "…"


def prompt_controls(cfg: AppConfig) -> str | None:
    """The chosen prompt (``None`` when there is none to choose yet)."""
    ss = st.session_state
    choices = session.prompt_choices(cfg)
    if choices and ss.get(session.PROMPT) not in choices:
        ss[session.PROMPT] = choices[0]
    prompt: str | None = None
    if choices:
        prompt = st.selectbox("Prompt", choices, key=session.PROMPT, format_func=_prompt_label)
    limit = cfg.max_user_string_length
    with st.expander("Add a prompt", expanded=not choices):
        # No max_chars: the browser would drop an over-long paste without a word; "Add prompt"
        # checks the length and says what is wrong, as for a prompt in a link.
        st.text_area(
            "Prompt text",
            key=session.NEW_PROMPT,
            height=90,
            placeholder="The capital of France is",
            help=None if limit is None else f"At most {limit:,} characters.",
        )
        st.button("Add prompt", key="add_prompt", on_click=session.add_prompt, args=(cfg,))
    if cfg.allow_loading_dataset_files and not cfg.demo_mode and cfg.prompts_dir is not None:
        files = prompt_files(cfg.prompts_dir)
        with st.expander("Load a prompt file"):
            if files:
                current = session.loaded_file_name()
                st.selectbox(
                    f"File in {cfg.prompts_dir.name}/",
                    files,
                    key=session.PROMPT_FILE,
                    help='One prompt per line, or LLM-TT\'s JSON lines with a "sentence". '
                    "Only files of the configured prompts folder can be opened.",
                )
                st.button(
                    "Load prompts",
                    key="load_prompts",
                    on_click=session.load_prompt_file,
                    args=(cfg,),
                )
                if current:
                    st.caption(f"Loaded: {current}")
            else:
                st.caption(f"No .txt or .jsonl files in {cfg.prompts_dir.name}/.")
    error = session.take_prompt_error()
    if error:
        show_error(error)
    return prompt


def graph_controls() -> GraphSettings:
    """The sidebar's toggles, and τ as the route view's slider last set it."""
    threshold = float(st.session_state.get(session.THRESHOLD, DEFAULT_THRESHOLD))
    renormalize = st.toggle(
        "Renormalize",
        key=session.RENORMALIZE,
        help="Rescale the parts of each node that survive τ to sum to 1.",
    )
    normalize_lens = st.toggle(
        "Normalize before unembedding",
        key=session.NORMALIZE_LENS,
        help="Logit lens: apply the model's final norm to a residual state before W_U.",
    )
    return GraphSettings(threshold, renormalize, normalize_lens)


def position_control(cached: CachedTrace) -> int:
    tokens = cached.trace.tokens
    position: int = st.selectbox(
        "Output position",
        list(range(len(tokens))),
        key=session.POSITION,
        format_func=lambda t: f"{t}: {display_token(tokens[t])}",
        help="The token whose next-token prediction the route explains. "
        "You can also click a ▼ above the graph.",
    )
    return position


def contrast_controls() -> tuple[str, str]:
    """Target and distractor tokens, exactly as typed (a leading space is part of a token)."""
    st.markdown("**Why A instead of B?**")
    left, right = st.columns(2)
    target: str = left.text_input(
        "Target token",
        key=session.TARGET,
        placeholder="␣Mary",
        help="One token of the model's vocabulary. Mid-sentence words usually start with a "
        "space: type “ Mary”, not “Mary”.",
    )
    distractor: str = right.text_input(
        "Distractor token",
        key=session.DISTRACTOR,
        placeholder="␣John",
        help="The token the model could have predicted instead.",
    )
    return target, distractor
