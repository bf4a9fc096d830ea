"""Where the flow graph's nodes and edges sit in its picture, in one place.

LLM-TT's layout (Tufanov et al. 2024, Fig. 1): x is the token position, y the depth, two rows
per layer. Row 0 holds the embeddings ``X0_t``; layer ``l`` has the residual after attention
``A{l}_t`` at ``y = 2l + 1`` and the residual after the layer ``I{l}_t`` at ``y = 2l + 2``, with
its FFN block ``M{l}_t`` halfway between them, :data:`FFN_OFFSET` right of the token's column; a
row of output markers sits one row above the last layer.

An attention edge into layer ``l`` runs from its source row (``y = 2l``: ``X0_s`` or
``I{l-1}_s``) up to ``A{l}_t``; the s = t edge bows :data:`SELF_BOW` left of the vertical
residual line so the two stay apart, and the FFN path bends right through its block square.
Plotly cannot click a line, so every edge has a click handle: at :data:`HANDLE_AT` of the way
along an attention edge, at the middle of a residual edge.

The functions take arrays of layers and tokens (one entry per node or edge) and return arrays,
so a figure places all of a route's edges in a few numpy operations. A "token" argument is an x
column: a figure passes each token through :attr:`Columns.x` first, which is the identity for
the full view and packs the route's tokens side by side in the compact view
(:func:`compact_columns`), where the hidden runs of tokens between them are :class:`Gap` marks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from llm_flow.engine.nodes import NodeKind

ROWS_PER_LAYER = 2
# y of each node kind within its layer's rows (the embedding row is layer 0's source row).
_ROW: dict[NodeKind, float] = {"X": 0.0, "A": 1.0, "M": 1.5, "I": 2.0}
SELF_BOW = 0.3  # how far the s = t attention curve bows left of the residual line
FFN_OFFSET = 0.3  # how far the FFN square sits right of the residual line
HANDLE_AT = 0.65  # where along an attention edge its click handle sits (0 source, 1 target)

MAX_VISIBLE_TOKENS = 40  # a longer full view opens zoomed on the output position; pan to see more
MAX_TICK_LABELS = 60  # more visible columns than this: label every k-th (plotly keeps fixed ticks)
MAX_LAYER_LABELS = 40
MAX_AXIS_LABELS = 400  # token axes of other pictures (the panels' heatmaps): every k-th beyond
COMPACT_ABOVE = 60  # longer prompts open on the route's tokens only
FIT_HEIGHT = 600  # px: the whole graph fits a 1366 × 768 window (below the page's header)

ResidualTarget = Literal["A", "I"]


def _floats(values: ArrayLike) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, dtype=float))


def node_x(kind: NodeKind, token: ArrayLike) -> np.ndarray:
    """x of nodes of ``kind`` at ``token``: the token's column (the FFN block right of it)."""
    return _floats(token) + (FFN_OFFSET if kind == "M" else 0.0)


def node_y(kind: NodeKind, layer: ArrayLike) -> np.ndarray:
    """y of nodes of ``kind`` in ``layer`` (embeddings: layer 0)."""
    return ROWS_PER_LAYER * _floats(layer) + _ROW[kind]


def source_y(layer: ArrayLike) -> np.ndarray:
    """y of the nodes attention and residual edges into ``layer`` start from (``X0`` for layer 0,
    else ``I{l-1}``)."""
    return ROWS_PER_LAYER * _floats(layer)


def output_y(n_layers: int) -> float:
    """y of the row of output markers, one row above the last layer's ``I`` nodes."""
    return float(node_y("A", n_layers)[0])


def attention_points(layer: ArrayLike, target: ArrayLike, source: ArrayLike) -> np.ndarray:
    """Attention edges ``source → target`` of ``layer`` as 3-point polylines → [E, 3, 2]."""
    t, s = _floats(target), _floats(source)
    y0, y1 = source_y(layer), node_y("A", layer)
    mid_x = np.where(t == s, t - SELF_BOW, (s + t) / 2)
    start, middle, end = (s, y0), (mid_x, (y0 + y1) / 2), (t, y1)
    return np.stack([np.stack(p, -1) for p in (start, middle, end)], axis=1)  # [E, 3, 2]


def attention_handles(
    layer: ArrayLike, target: ArrayLike, source: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """(x [E], y [E]) of the click handles of attention edges: on the bow of an s = t edge,
    else :data:`HANDLE_AT` of the way from source to target."""
    t, s = _floats(target), _floats(source)
    y0, y1 = source_y(layer), node_y("A", layer)
    self_edge = t == s
    x = np.where(self_edge, t - SELF_BOW, s + HANDLE_AT * (t - s))
    y = np.where(self_edge, (y0 + y1) / 2, y0 + HANDLE_AT * (y1 - y0))
    return x, y


def _residual_ends(into: ResidualTarget, layer: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    if into == "A":
        return source_y(layer), node_y("A", layer)
    return node_y("A", layer), node_y("I", layer)


def residual_points(into: ResidualTarget, layer: ArrayLike, token: ArrayLike) -> np.ndarray:
    """Residual edges into ``A{l}_t`` (from the source row) or ``I{l}_t`` (from ``A{l}_t``) as
    vertical 2-point lines → [E, 2, 2]."""
    t = _floats(token)
    y0, y1 = _residual_ends(into, layer)
    return np.stack([np.stack([t, y0], -1), np.stack([t, y1], -1)], axis=1)  # [E, 2, 2]


def crossing_y(points: np.ndarray, x: float) -> np.ndarray:
    """y where each polyline of ``points`` [E, P, 2] (x ascending along it) crosses the vertical
    line at ``x`` → [E], NaN where it does not."""
    x0, x1 = points[:, :-1, 0], points[:, 1:, 0]  # [E, P-1] segment ends
    y0, y1 = points[:, :-1, 1], points[:, 1:, 1]
    inside = (x0 <= x) & (x < x1)
    share = np.divide(x - x0, x1 - x0, out=np.zeros_like(x0), where=x1 > x0)
    return _first_finite(np.where(inside, y0 + share * (y1 - y0), np.nan))


def _first_finite(values: np.ndarray) -> np.ndarray:
    """Per row of [E, K], the first non-NaN value (NaN when there is none)."""
    finite = ~np.isnan(values)
    first = finite.argmax(axis=1)
    found = values[np.arange(len(values)), first]
    return np.where(finite.any(axis=1), found, np.nan)


def ffn_points(layer: ArrayLike, token: ArrayLike) -> np.ndarray:
    """``A{l}_t → M{l}_t → I{l}_t`` as one bent 3-point polyline per FFN block → [E, 3, 2]."""
    corners = [(node_x(k, token), node_y(k, layer)) for k in ("A", "M", "I")]
    return np.stack([np.stack(p, -1) for p in corners], axis=1)  # [E, 3, 2]


# -- columns ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    """Tokens ``first`` … ``last`` (inclusive) that the compact view hides, marked at ``x``
    (between the columns either side)."""

    x: float
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Columns:
    """Which x column each token of a picture sits in: ``x`` [T] (NaN for a hidden token), the
    shown ``tokens`` left to right and the :class:`Gap` marks of the hidden ones."""

    x: np.ndarray
    tokens: tuple[int, ...]
    gaps: tuple[Gap, ...] = ()

    @property
    def compact(self) -> bool:
        return len(self.tokens) < len(self.x)

    def of(self, token: ArrayLike) -> np.ndarray:
        """x columns of ``token`` (an array of token positions)."""
        return self.x[np.atleast_1d(np.asarray(token, dtype=int))]


def all_columns(n_tokens: int) -> Columns:
    """The full view: token t in column t."""
    return Columns(np.arange(n_tokens, dtype=float), tuple(range(n_tokens)))


def compact_columns(shown: Iterable[int], n_tokens: int) -> Columns:
    """The compact view: the ``shown`` tokens (those a route touches) in adjacent columns, in
    order, and a :class:`Gap` wherever tokens between, before or after them are hidden."""
    tokens = sorted(set(shown))
    if tokens and not 0 <= tokens[0] <= tokens[-1] < n_tokens:
        raise ValueError(f"shown tokens must lie in 0 … {n_tokens - 1}, got {tokens}")
    x = np.full(n_tokens, np.nan)
    x[tokens] = np.arange(len(tokens), dtype=float)
    bounds = [-1, *tokens, n_tokens]  # sentinels: a run hidden before the first or after the last
    gaps = tuple(
        Gap(column - 0.5, before + 1, after - 1)
        for column, (before, after) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        if after - before > 1
    )
    return Columns(x, tuple(tokens), gaps)


# -- axes -------------------------------------------------------------------------------------


def thinned_ticks(n_tokens: int) -> list[int]:
    """Every k-th token of a plain token axis, at most :data:`MAX_AXIS_LABELS` of them."""
    return list(range(0, n_tokens, max(1, math.ceil(n_tokens / MAX_AXIS_LABELS))))


def token_ticks(columns: Columns, position: int) -> list[int]:
    """The tokens that get an axis label: every shown one, or every k-th when more columns than
    :data:`MAX_TICK_LABELS` are visible when the figure opens (:func:`x_window`); the output
    ``position`` always."""
    low, high = x_window(columns, position)
    visible = sum(1 for t in columns.tokens if low <= columns.x[t] <= high)
    step = max(1, math.ceil(visible / MAX_TICK_LABELS))
    ticks = set(columns.tokens[::step])
    if 0 <= position < len(columns.x) and not np.isnan(columns.x[position]):
        ticks.add(position)
    return sorted(ticks)


def layer_ticks(n_layers: int) -> tuple[list[float], list[str]]:
    """(y values, labels) of the depth axis: ``emb``, each layer at its FFN row, ``out``."""
    step = 1 if n_layers <= MAX_LAYER_LABELS else math.ceil(n_layers / MAX_LAYER_LABELS)
    layers = list(range(0, n_layers, step))
    values = [float(node_y("X", 0)[0]), *node_y("M", layers).tolist(), output_y(n_layers)]
    return values, ["emb", *(str(layer) for layer in layers), "out"]


def x_window(columns: Columns, position: int) -> tuple[float, float]:
    """The x range a figure opens on: every column of a compact view or of a short prompt, else
    the last :data:`MAX_VISIBLE_TOKENS` tokens up to ``position``."""
    n = len(columns.tokens)
    if columns.compact or n <= MAX_VISIBLE_TOKENS:
        return -0.7, n - 0.4
    high = max(float(columns.x[position]), MAX_VISIBLE_TOKENS - 1)
    return high - MAX_VISIBLE_TOKENS + 0.6, high + 0.6


def figure_height(n_layers: int) -> int:
    """~26 px per layer, at most :data:`FIT_HEIGHT`: a 30-layer model's whole route stays in a
    laptop's window (rows get tighter rather than the graph taller than the screen)."""
    return int(min(FIT_HEIGHT, max(460, 160 + 26 * n_layers)))
