"""The explorer's per-browser-session state: widget values, the current selection and what is
shown, in ``st.session_state`` under the keys below.

The widgets' starting values are set once per session from the URL (``st.query_params``, read
by :func:`init_session`) and the view is written back after every run (:func:`write_url`), so
a link reproduces the view. Widgets are created with these keys and no default of their own,
so there is one source of truth. Callbacks of buttons and the graph live here too.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st
import torch

from app.cache import AblationKey, DatasetKey, FaithfulnessKey, prompts_of
from app.selection import Selection, clicked, selected_row
from llm_flow.config import AppConfig
from llm_flow.engine.routes import DEFAULT_THRESHOLD
from llm_flow.errors import LlmFlowError, PromptError
from llm_flow.io.figure import parse_position
from llm_flow.io.layout import COMPACT_ABOVE

THRESHOLD_MAX = 0.2
# As the CLI's --dtype: half precision runs on a CPU too (slower there, half the memory).
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DEVICE = "cpu"

# Session-state keys of widgets (the widgets are created with these keys).
MODEL = "model"
CUSTOM_MODEL = "custom_model"
DEVICE = "device"
DTYPE = "dtype"
PROMPT = "prompt"
NEW_PROMPT = "new_prompt"
PROMPT_FILE = "prompt_file"
THRESHOLD = "threshold"
RENORMALIZE = "renormalize"
NORMALIZE_LENS = "normalize_lens"
POSITION = "position"
COMPACT = "compact"  # the graph shows the route's tokens only
GRAPH = "graph"
TARGET = "target"
DISTRACTOR = "distractor"
EFFECTS_TABLE = "effects_table"
ABLATE_HEADS = "ablate_heads"
ABLATE_NEURONS = "ablate_neurons"
ABLATE_EXPERTS = "ablate_experts"
ABLATE_EDGE = "ablate_edge"
ABLATE_LATENTS = "ablate_latents"
LATENT_SCALE = "latent_scale"
ABLATION_MODE = "ablation_mode"
MEAN_FILE = "mean_file"
FAITHFULNESS_DRAWS = "faithfulness_draws"
INTERVENTIONS = "interventions_open"  # the ablation/faithfulness expander
DATASET_A = "dataset_a"
DATASET_B = "dataset_b"
# Session-state keys of values no widget owns.
SELECTION = "selection"
SHOWN_ABLATION = "shown_ablation"
SHOWN_FAITHFULNESS = "shown_faithfulness"
_EXTRA_PROMPTS = "extra_prompts"
_FILE_PROMPTS = "file_prompts"
_PROMPT_ERROR = "prompt_error"
_NOTICES = "notices"
_VIEW = "view"
_INITIALIZED = "initialized"
_TABLE_ROW = "table_row"
_SHOWN_DATASET = "shown_dataset"
_DATASET_DRAWN_AT = "dataset_drawn_at"
_PREFERRED_UNIT = "preferred_unit"
_ABLATION_ASKED = "ablation_asked"

CUSTOM_CHOICE = "Custom model…"


def devices() -> list[str]:
    """The devices this machine offers (cuda only when a GPU is visible)."""
    return [DEFAULT_DEVICE] + (["cuda"] if torch.cuda.is_available() else [])


def init_session(cfg: AppConfig) -> None:
    """Set every widget's starting value once per browser session, from the URL if it has one.

    Widgets are then created with keys only (no ``value=``/``index=``), so Streamlit never sees
    two competing defaults.
    """
    ss = st.session_state
    if ss.get(_INITIALIZED):
        return
    ss[_INITIALIZED] = True
    params = st.query_params
    notices: list[str] = []

    model = params.get("model")
    if model in cfg.model_names():
        ss[MODEL] = model
    elif model and not cfg.demo_mode:
        ss[MODEL] = CUSTOM_CHOICE
        ss[CUSTOM_MODEL] = model
    else:
        ss[MODEL] = cfg.default_model
        if model:
            notices.append(
                f"The link's model {model!r} is not available here; showing {cfg.default_model!r}."
            )
    ss.setdefault(CUSTOM_MODEL, "")
    ss[DEVICE] = DEFAULT_DEVICE
    device = params.get("device")
    if device in devices():
        ss[DEVICE] = device
    elif device:
        notices.append(
            f"The link's device {device!r} is not available here "
            f"(this machine offers {', '.join(devices())}); using {DEFAULT_DEVICE!r}."
        )
    ss[DTYPE] = DTYPES[0]
    dtype = params.get("dtype")
    if dtype in DTYPES:
        ss[DTYPE] = dtype
    elif dtype:
        notices.append(
            f"The link's precision {dtype!r} is not one of {', '.join(DTYPES)}; "
            f"using {DTYPES[0]!r}."
        )

    prompt = params.get("prompt")
    ss[_EXTRA_PROMPTS] = [prompt] if prompt else []
    ss[_FILE_PROMPTS] = None
    if prompt:
        ss[PROMPT] = prompt
    ss[NEW_PROMPT] = ""

    ss[THRESHOLD] = DEFAULT_THRESHOLD
    raw_threshold = params.get("threshold")
    if raw_threshold is not None:
        try:
            value = float(raw_threshold)
        except ValueError:
            value = -1.0
        if 0.0 <= value <= THRESHOLD_MAX:
            ss[THRESHOLD] = value
        else:
            notices.append(
                f"The link's threshold {raw_threshold!r} is not between 0 and {THRESHOLD_MAX}; "
                f"using {DEFAULT_THRESHOLD}."
            )
    ss[RENORMALIZE] = params.get("renormalize", "1") != "0"
    ss[NORMALIZE_LENS] = params.get("normalize", "1") != "0"

    raw_position = params.get("position")
    if raw_position is not None:
        if raw_position.isdigit():
            ss[POSITION] = int(raw_position)
        else:
            notices.append(f"The link's position {raw_position!r} is not a token index.")
    ss[SELECTION] = params.get("selection") or None
    # Kept exactly as typed: " Mary" (with its space) and "Mary" are different tokens.
    ss[TARGET] = params.get("target", "")
    ss[DISTRACTOR] = params.get("distractor", "")
    ss[ABLATE_HEADS] = []
    ss[ABLATE_NEURONS] = ""
    ss[ABLATE_EXPERTS] = []
    ss[ABLATE_EDGE] = False
    ss[ABLATION_MODE] = "zero"
    ss[_NOTICES] = notices


def write_url(
    *,
    model: str,
    device: str,
    dtype: str,
    prompt: str,
    position: int,
    threshold: float,
    renormalize: bool,
    normalize_lens: bool,
    selection: Selection | None,
    target: str,
    distractor: str,
) -> None:
    """Put the current view into the URL under the names :func:`init_session` reads, defaults
    left out (only when it changed, to keep history clean)."""
    params = {
        "model": model,
        "device": None if device == DEFAULT_DEVICE else device,
        "dtype": None if dtype == DTYPES[0] else dtype,
        "prompt": prompt,
        "position": position,
        "threshold": f"{threshold:g}",
        "selection": selection.id if selection else None,
        "renormalize": None if renormalize else "0",
        "normalize": None if normalize_lens else "0",
        "target": target,
        "distractor": distractor,
    }
    wanted = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


def take_notices() -> list[str]:
    """Messages for the user that arose outside the page (URL parsing, callbacks), once each."""
    notices: list[str] = st.session_state.get(_NOTICES, [])
    st.session_state[_NOTICES] = []
    return notices


# -- prompts ----------------------------------------------------------------------------------


def prompt_choices(cfg: AppConfig) -> list[str]:
    """Prompts the picker offers: added ones first, then a loaded file's, then the preloaded."""
    ss = st.session_state
    choices: list[str] = list(ss.get(_EXTRA_PROMPTS, []))
    loaded = ss.get(_FILE_PROMPTS)
    if loaded is not None:
        choices += loaded[1]
    preloaded = cfg.preloaded_dataset_filename
    if preloaded is not None and preloaded.is_file():
        choices += prompts_of(preloaded)
    return list(dict.fromkeys(choices))


def loaded_file_name() -> str | None:
    loaded = st.session_state.get(_FILE_PROMPTS)
    return None if loaded is None else str(loaded[0])


def take_prompt_error() -> str | None:
    """The last prompt action's error, shown once."""
    error: str | None = st.session_state.pop(_PROMPT_ERROR, None)
    return error


def add_prompt(cfg: AppConfig) -> None:
    """Callback of "Add prompt": check the typed prompt and select it."""
    ss = st.session_state
    text = ss.get(NEW_PROMPT, "")
    try:
        cfg.check_prompt(text)
    except LlmFlowError as exc:
        ss[_PROMPT_ERROR] = str(exc)
        return
    ss[_PROMPT_ERROR] = None
    extra = [p for p in ss.get(_EXTRA_PROMPTS, []) if p != text]
    ss[_EXTRA_PROMPTS] = [text, *extra]
    ss[PROMPT] = text
    ss[NEW_PROMPT] = ""


def load_prompt_file(cfg: AppConfig) -> None:
    """Callback of "Load prompts": only files inside ``prompts_dir`` (``cfg.prompt_file``)."""
    ss = st.session_state
    name = ss.get(PROMPT_FILE)
    try:
        if not name:
            raise PromptError("choose a prompt file first")
        prompts = prompts_of(cfg.prompt_file(name))
    except LlmFlowError as exc:
        ss[_PROMPT_ERROR] = str(exc)
        return
    ss[_PROMPT_ERROR] = None
    ss[_FILE_PROMPTS] = (name, prompts)
    ss[PROMPT] = prompts[0]


# -- the selection ----------------------------------------------------------------------------


def on_graph_select() -> None:
    """Callback of the graph's ``on_select``: a click selects an edge, block or node, or an
    output position.

    The chart's own widget state cannot be the selection: Streamlit re-creates the chart (and
    empties its state) whenever the figure changes, e.g. on every slider move. So a click is
    copied into ``SELECTION``, which only another click (or "Clear selection") replaces. An empty
    event (a click on empty space, a re-created chart) keeps the selection.
    """
    target = clicked(st.session_state.get(GRAPH))
    if target is not None:
        select_clicked(target)


def select_clicked(target: str) -> None:
    """A click on the graph: an output marker's ``pos:t`` chooses the position, anything else
    (a node, block or edge id) becomes the selection."""
    position = parse_position(target)
    if position is not None:
        st.session_state[POSITION] = position
    else:
        st.session_state[SELECTION] = target


def take_table_selection(ids: Sequence[str], units: Sequence[int | None] = ()) -> None:
    """Select the graph element of the effect table's newly selected row (``ids[i]`` is row
    i's selection string, ``units[i]`` its head or neuron, which the panel then preselects).

    Read at the top of a run, before the graph is drawn, so the highlight follows at once. Only
    a *change* of the table's row selects: the table keeps its row across reruns, and a later
    click on the graph must win. Rows count in the table's original order, whatever sorting the
    user applied in the browser.
    """
    ss = st.session_state
    row = selected_row(ss.get(EFFECTS_TABLE))
    if row == ss.get(_TABLE_ROW):
        return
    ss[_TABLE_ROW] = row
    if row is not None and 0 <= row < len(ids):
        ss[SELECTION] = ids[row]
        ss[_PREFERRED_UNIT] = (ids[row], units[row] if row < len(units) else None)


def preferred_unit(selection_id: str) -> int | None:
    """The head or neuron of the table row that selected ``selection_id``, if one did."""
    preferred = st.session_state.get(_PREFERRED_UNIT)
    if isinstance(preferred, tuple) and preferred[0] == selection_id:
        unit: int | None = preferred[1]
        return unit
    return None


def select(selection: str | None) -> None:
    st.session_state[SELECTION] = selection


def select_with_unit(selection: str, unit: int | None) -> None:
    """Select ``selection`` with its head, neuron or expert ``unit`` preselected in its panel."""
    st.session_state[SELECTION] = selection
    st.session_state[_PREFERRED_UNIT] = (selection, unit)


def selection() -> str | None:
    value: str | None = st.session_state.get(SELECTION)
    return value


def start_view(view: tuple[str, str], n_tokens: int) -> None:
    """Forget the position and selection when the model or prompt changes; clamp the position.
    A new view of a long prompt opens on the route's tokens only.

    The first view of a session keeps what the URL said (it is checked against the graph).
    """
    ss = st.session_state
    if ss.get(_VIEW) != view:
        if _VIEW in ss:
            ss[SELECTION] = None
            ss.pop(POSITION, None)
        ss[_VIEW] = view
        ss[COMPACT] = n_tokens > COMPACT_ABOVE
    position = ss.get(POSITION)
    if not isinstance(position, int) or not 0 <= position < n_tokens:
        if position is not None:
            ss.setdefault(_NOTICES, []).append(
                f"Position {position} is outside this prompt's {n_tokens} tokens; "
                "showing the last token."
            )
        ss[POSITION] = n_tokens - 1


# -- results on show --------------------------------------------------------------------------


def show_ablation(key: AblationKey) -> None:
    st.session_state[SHOWN_ABLATION] = key


def shown_ablation() -> AblationKey | None:
    key: AblationKey | None = st.session_state.get(SHOWN_ABLATION)
    return key


def ablate_latent(latent: str, scale: float) -> None:
    """A latents panel's "scale this latent": the interventions below open with only ``latent``
    (``HOOK:I``) to scale by ``scale``, and run it (:func:`take_ablation_request`)."""
    ss = st.session_state
    ss[ABLATE_LATENTS], ss[LATENT_SCALE] = latent, scale
    ss[ABLATE_HEADS], ss[ABLATE_EXPERTS], ss[ABLATE_NEURONS], ss[ABLATE_EDGE] = [], [], "", False
    ss[INTERVENTIONS] = True
    ss[_ABLATION_ASKED] = True


def take_ablation_request() -> bool:
    """Whether a panel asked the interventions to run their ablation (once)."""
    return bool(st.session_state.pop(_ABLATION_ASKED, False))


def show_faithfulness(key: FaithfulnessKey) -> None:
    st.session_state[SHOWN_FAITHFULNESS] = key


def shown_faithfulness() -> FaithfulnessKey | None:
    key: FaithfulnessKey | None = st.session_state.get(SHOWN_FAITHFULNESS)
    return key


def show_dataset(key: DatasetKey) -> None:
    st.session_state[_SHOWN_DATASET] = key


def shown_dataset() -> DatasetKey | None:
    key: DatasetKey | None = st.session_state.get(_SHOWN_DATASET)
    return key


def note_dataset_drawn(threshold: float | None) -> None:
    """The τ the dataset tab last compared its tables with (None: it shows no tables)."""
    st.session_state[_DATASET_DRAWN_AT] = threshold


def dataset_drawn_at() -> float | None:
    threshold: float | None = st.session_state.get(_DATASET_DRAWN_AT)
    return threshold
