"""Sparse autoencoders (SAEs) on the residual stream: reading them, encoding, decoding.

An SAE on a residual hook writes a state as ``x ≈ c · (Σ_i f_i d_i + b_dec)`` with latent
activations ``f = σ(c·x − a·b_dec) W_enc + b_enc)`` (``a`` = ``apply_b_dec_to_input``), decoder
rows ``d_i = W_dec[i]`` and ``c`` = 1 unless the SAE normalizes its input per token
(``constant_norm_rescale``: ``c = √d_in / ‖x‖`` on the way in, ``1/c`` on the way out). The
activation σ is ReLU (``standard``), ReLU on the ``k`` largest pre-activations (``topk``; Gao et al.
2024, arXiv 2406.04093) or JumpReLU (``jumprelu``: ``pre · [pre > θ]``; Rajamanoharan et al. 2024,
arXiv 2407.14435, the Gemma Scope SAEs).

Two formats are read:
- SAELens's folder (``cfg.json`` + ``sae_weights.safetensors``; SAELens 6 keeps ``hook_name`` under
  ``metadata``, older versions at the top level). ``expected_average_only_in`` with a
  ``norm_scaling_factor`` in the cfg is folded into the weights, as SAELens does on loading.
- Gemma Scope's ``params.npz`` (JumpReLU, no input normalization, hook given by the caller).

A hub repository (``owner/name`` or ``owner/name/sub/folder``) is downloaded with huggingface_hub
when the machine is online and read from its cache when not; otherwise :class:`OfflineError`.

SAELens names residual hooks as TransformerLens does; :func:`hook_of_node` and
:func:`node_kind_of_hook` map them to llm-flow's residual nodes: ``blocks.{l}.hook_resid_post`` is
``I{l}_t``, ``blocks.{l}.hook_resid_pre`` is ``I{l-1}_t`` (``X0_t`` for l = 0) and
``blocks.{l}.hook_resid_mid`` is ``A{l}_t``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

import numpy as np
import torch
from torch import Tensor

from llm_flow.errors import OfflineError, SaeError
from llm_flow.models.loading import _hub_reachable, cache_dir

Architecture = Literal["standard", "jumprelu", "topk"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
Normalization = Literal["none", "expected_average_only_in", "constant_norm_rescale"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NPZ_FILE = "params.npz"
HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-/]+)?$")


@dataclass(frozen=True, eq=False)
class Sae:
    """One SAE's weights (float32) and how it encodes. ``threshold`` [d_sae] for ``jumprelu``,
    ``k`` for ``topk``."""

    hook: str | None  # e.g. "blocks.3.hook_resid_post"; None until a caller names it (npz)
    architecture: Architecture
    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    apply_b_dec_to_input: bool = False
    normalize_activations: Normalization = "none"
    threshold: Tensor | None = None
    k: int | None = None
    source: str = ""  # where it was read from

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SaeError(
                f"{self.source}: unknown SAE architecture {self.architecture!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise SaeError(
                f"{self.source}: unsupported normalize_activations "
                f"{self.normalize_activations!r}; supported: {', '.join(NORMALIZATIONS)}"
            )
        d_in, d_sae = self.W_enc.shape
        shapes = {
            "b_enc": (self.b_enc.shape, (d_sae,)),
            "W_dec": (self.W_dec.shape, (d_sae, d_in)),
            "b_dec": (self.b_dec.shape, (d_in,)),
        }
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise SaeError(f"{self.source}: a jumprelu SAE needs a 'threshold'")
            shapes["threshold"] = (self.threshold.shape, (d_sae,))
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise SaeError(f"{self.source}: {name} has shape {tuple(got)}, expected {want}")
        if self.architecture == "topk" and (self.k is None or not 1 <= self.k <= d_sae):
            raise SaeError(f"{self.source}: a topk SAE needs 1 ≤ k ≤ {d_sae}, got {self.k}")
        if self.hook is not None and not HOOK.match(self.hook):
            raise SaeError(
                f"{self.source}: hook {self.hook!r} is not a residual hook; llm-flow reads SAEs "
                "on blocks.{l}.hook_resid_pre, blocks.{l}.hook_resid_mid or "
                "blocks.{l}.hook_resid_post"
            )

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def input_scale(self, x: Tensor) -> Tensor:
        """The per-token input scale ``c`` [...]: ``√d_in / ‖x‖`` for ``constant_norm_rescale``,
        else ones."""
        if self.normalize_activations != "constant_norm_rescale":
            return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        return self.d_in**0.5 / x.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``f`` [..., d_sae] of states ``x`` [..., d_in], in x's float dtype."""
        x = x.float() if not x.is_floating_point() else x
        w = self.W_enc.to(x)
        sae_in = x * self.input_scale(x)[..., None]
        if self.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec.to(x)
        pre = sae_in @ w + self.b_enc.to(x)  # [..., d_sae]
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "jumprelu":
            assert self.threshold is not None  # checked in __post_init__
            return pre * (pre > self.threshold.to(x))
        assert self.k is not None
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, acts: Tensor, scale: Tensor | None = None) -> Tensor:
        """The reconstruction ``(f W_dec + b_dec) / c`` [..., d_in] (``scale`` = c, default 1)."""
        out = acts @ self.W_dec.to(acts) + self.b_dec.to(acts)
        return out if scale is None else out / scale[..., None]

    def fingerprint(self) -> str:
        """A hash of what the activations depend on (architecture, settings, weights): two SAEs
        with the same fingerprint encode alike, wherever they were read from."""
        digest = hashlib.sha256()
        facts = [self.architecture, self.apply_b_dec_to_input, self.normalize_activations, self.k]
        digest.update(json.dumps(facts).encode())
        for tensor in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold):
            if tensor is not None:
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def with_hook(self, hook: str) -> Sae:
        """This SAE read on ``hook`` (Gemma Scope files do not name theirs)."""
        return Sae(**{**self.__dict__, "hook": hook})


# -- hooks and nodes ---------------------------------------------------------------------------


def parse_hook(hook: str) -> tuple[int, str]:
    """``blocks.{l}.hook_resid_{kind}`` → (l, kind); :class:`SaeError` for any other name."""
    match = HOOK.match(hook)
    if match is None:
        raise SaeError(
            f"{hook!r} is not a residual hook; valid hooks are blocks.{{l}}.hook_resid_pre, "
            "blocks.{l}.hook_resid_mid and blocks.{l}.hook_resid_post"
        )
    return int(match.group(1)), match.group(2)


def node_of_hook(hook: str, position: int) -> str:
    """The residual node a hook reads at ``position``: ``I{l}``, ``I{l-1}``/``X0`` or ``A{l}``."""
    layer, kind = parse_hook(hook)
    if kind == "post":
        return f"I{layer}_{position}"
    if kind == "mid":
        return f"A{layer}_{position}"
    return f"X0_{position}" if layer == 0 else f"I{layer - 1}_{position}"


def hooks_of_node(kind: str, layer: int) -> tuple[str, ...]:
    """Every hook name that reads the residual node of ``kind`` (X, A or I) at ``layer``:
    ``I{l}`` is both ``blocks.{l}.hook_resid_post`` and ``blocks.{l+1}.hook_resid_pre``."""
    if kind == "X":
        return ("blocks.0.hook_resid_pre",)
    if kind == "A":
        return (f"blocks.{layer}.hook_resid_mid",)
    return (f"blocks.{layer}.hook_resid_post", f"blocks.{layer + 1}.hook_resid_pre")


# -- reading and writing -----------------------------------------------------------------------


def _tensor(value: object) -> Tensor:
    return torch.as_tensor(np.asarray(value), dtype=torch.float32)


def _read_saelens(folder: Path) -> Sae:
    from safetensors.torch import load_file

    source = str(folder)
    try:
        cfg = json.loads((folder / CFG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SaeError(f"{source}: cannot read {CFG_FILE}: {exc}") from None
    weights = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in weights]
    if missing:
        raise SaeError(f"{source}: {WEIGHTS_FILE} lacks {', '.join(missing)}")
    metadata = cfg.get("metadata") or {}
    hook = metadata.get("hook_name", cfg.get("hook_name"))
    norm = cfg.get("normalize_activations") or "none"
    W_enc, W_dec, b_dec = weights["W_enc"], weights["W_dec"], weights["b_dec"]
    factor = cfg.get("norm_scaling_factor")
    if norm == "expected_average_only_in" and factor is not None:
        # Scale in, not out: f(s·x) decoded and divided by s is the folded SAE on x (SAELens's
        # fold_activation_norm_scaling_factor).
        W_enc, W_dec, b_dec = W_enc * factor, W_dec / factor, b_dec / factor
        norm = "none"
    elif norm == "expected_average_only_in":
        norm = "none"  # SAELens runs an unfolded one without scaling, too
    return Sae(
        hook=hook,
        architecture=cast(Architecture, cfg.get("architecture", "standard")),
        W_enc=W_enc,
        b_enc=weights["b_enc"],
        W_dec=W_dec,
        b_dec=b_dec,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
        normalize_activations=cast(Normalization, norm),
        threshold=weights.get("threshold"),
        k=cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k")),
        source=source,
    )


def _read_npz(path: Path, hook: str | None) -> Sae:
    with np.load(path) as params:
        names = set(params.files)
        missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} - names)
        if missing:
            raise SaeError(f"{path}: a Gemma Scope params.npz needs {', '.join(missing)}")
        p = {name: _tensor(params[name]) for name in names}
    return Sae(
        hook=hook,
        architecture="jumprelu",
        W_enc=p["W_enc"],
        b_enc=p["b_enc"],
        W_dec=p["W_dec"],
        b_dec=p["b_dec"],
        threshold=p["threshold"],
        source=str(path),
    )


def _from_hub(repo: str) -> Path:
    """The local folder of ``owner/name[/sub/folder]``, downloaded if needed and possible."""
    owner, name, *sub = repo.split("/")
    folder = "/".join(sub)
    patterns = [f"{folder}/*"] if folder else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = snapshot_download(f"{owner}/{name}", allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:  # not in the cache: the network, if there is one
        if not _hub_reachable():
            raise OfflineError(
                f"SAE {repo!r} is not in the local Hugging Face cache and the hub cannot be "
                "reached (offline?); connect once, or give a local SAE folder (train one with "
                "'llm-flow sae train')"
            ) from None
        try:
            root = snapshot_download(f"{owner}/{name}", allow_patterns=patterns)
        except Exception as exc:  # the hub's many error types (missing repo, HTTP), in words
            raise SaeError(f"cannot download SAE {repo!r}: {exc}") from None
    return Path(root) / folder


def load_sae(path_or_repo: str | Path, hook: str | None = None) -> Sae:
    """An SAE from a SAELens folder, a Gemma Scope ``params.npz`` (or a folder holding one), or
    a hub repository ``owner/name[/sub/folder]``. ``hook`` names the hook for files that do not,
    and must agree with one that does."""
    text = str(path_or_repo)
    path = Path(text).expanduser()
    if not path.exists():
        if _REPO.match(text) and not text.startswith((".", "/", "~")):
            path = _from_hub(text)
        else:
            raise SaeError(f"no SAE at {text!r}: no such file or folder")
    if path.is_dir() and (path / CFG_FILE).is_file():
        sae = _read_saelens(path)
    elif path.is_file() and path.suffix == ".npz":
        sae = _read_npz(path, hook)
    elif path.is_dir() and (path / NPZ_FILE).is_file():
        sae = _read_npz(path / NPZ_FILE, hook)
    else:
        raise SaeError(
            f"{text!r} holds no SAE: expected a SAELens folder ({CFG_FILE} + {WEIGHTS_FILE}) "
            f"or a Gemma Scope {NPZ_FILE}"
        )
    if hook is not None and sae.hook is not None and sae.hook != hook:
        raise SaeError(f"{text!r} is an SAE on {sae.hook!r}, not on {hook!r}")
    return sae if sae.hook is not None or hook is None else sae.with_hook(hook)


def save_sae(sae: Sae, folder: Path, model_name: str = "") -> Path:
    """Write ``sae`` in SAELens's folder format (what :func:`load_sae` and SAELens read)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    cfg: dict[str, object] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations,
        "reshape_activations": "none",
        "metadata": {"hook_name": sae.hook, "model_name": model_name},
    }
    if sae.k is not None:
        cfg["k"] = sae.k
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return folder


def trained_sae_dir(model_name: str, hook: str) -> Path:
    """Where ``llm-flow sae train`` keeps the SAE of a model on a hook:
    ``<cache>/saes/<model>/<hook>/`` (the model name made a safe folder name)."""
    return _trained_root(model_name) / hook


def _trained_root(model_name: str) -> Path:
    safe = re.sub(r"[^\w.\-]+", "_", model_name).strip("_") or "model"
    return cache_dir() / "saes" / safe


def locate_sae(
    configured: tuple[tuple[str, str], ...], model_name: str, kind: str, layer: int
) -> tuple[str, str] | None:
    """(hook, source) of the SAE on the residual node of ``kind`` (X, A or I) at ``layer``,
    unloaded: the one a model's config entry names (``configured``: its ``saes`` pairs) for any
    hook that reads that node, else the one ``llm-flow sae train`` left in the cache; None when
    there is neither."""
    hooks = hooks_of_node(kind, layer)
    sources = dict(configured)
    for hook in hooks:
        if hook in sources:
            return hook, sources[hook]
    for hook in hooks:
        if (trained_sae_dir(model_name, hook) / CFG_FILE).is_file():
            return hook, str(trained_sae_dir(model_name, hook))
    return None


def sae_hooks(configured: tuple[tuple[str, str], ...], model_name: str) -> tuple[str, ...]:
    """Every hook a model has an SAE on (its config entry's and the trained ones), by layer."""
    root = _trained_root(model_name)
    trained = [
        folder.name
        for folder in (root.iterdir() if root.is_dir() else ())
        if HOOK.match(folder.name) and (folder / CFG_FILE).is_file()
    ]
    return tuple(sorted({*dict(configured), *trained}, key=parse_hook))


def find_sae(
    configured: tuple[tuple[str, str], ...], model_name: str, kind: str, layer: int
) -> Sae:
    """The SAE :func:`locate_sae` finds, loaded; :class:`SaeError` naming the config key when
    there is none."""
    found = locate_sae(configured, model_name, kind, layer)
    if found is not None:
        return load_sae(found[1], found[0])
    hooks = hooks_of_node(kind, layer)
    train = f"; or train one: llm-flow sae train --layer {layer}" if kind == "I" else ""
    raise SaeError(
        f"no SAE for the {kind}{layer} residual of model {model_name!r}: add "
        f'"saes": {{"{hooks[0]}": PATH_OR_REPO}} to its config entry, or pass --sae PATH{train}'
    )
