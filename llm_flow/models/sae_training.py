"""Training a small sparse autoencoder on one residual hook, on the CPU.

The recipe of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", arXiv 2406.04093)
for ``topk`` SAEs: inputs scaled so their mean norm is √d (the factor is folded into the saved
weights, as SAELens's ``expected_average_only_in`` does), ``b_dec`` started at the mean and
subtracted before encoding, the encoder started as the decoder's transpose, unit-norm decoder rows
kept after every Adam step, mean squared error as the loss. ``standard`` SAEs (ReLU) add the L1
penalty ``λ Σ_i f_i ‖d_i‖`` (Bricken et al. 2023, "Towards Monosemanticity").

Memory is bounded: the corpus comes as token windows (``llm-flow sae train`` cuts the shipped
corpus, or ``--corpus``, with :func:`llm_flow.io.corpus.token_windows`, as the corpus index does)
and the residual at the hook is kept for at most ``max_tokens`` tokens (the first token of each
window, an attention sink with an outsized norm, is left out); each step samples a batch from
that buffer. A tenth of the
windows is held out to report explained variance and L0 at the end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm_flow.errors import SaeError
from llm_flow.models.base import TransparentLlm
from llm_flow.models.sae import Architecture, Sae

# (phase, done, total): phase "activations" (windows run) or "training" (steps done).
TrainProgress = Callable[[str, int, int], None]


class _Captured(Exception):
    """Stops a pass once the hooked layer has run."""


def residuals(
    llm: TransparentLlm,
    windows: Iterable[Sequence[int]],
    hook: str,
    *,
    max_tokens: int = 32768,
    progress: TrainProgress | None = None,
) -> tuple[Tensor, Tensor]:
    """The residual at ``hook`` over token ``windows`` (each one a context the model reads, as
    :func:`llm_flow.io.corpus.token_windows` cuts them) → ([N, D] float32, [N] window index), at
    most ``max_tokens`` rows, each window's first token left out. Windows are read only while
    rows are wanted."""
    wanted: list[Sequence[int]] = []
    rows_left = max_tokens
    for w in windows:
        if len(w) > 1:
            wanted.append(w)
            rows_left -= len(w) - 1
        if rows_left <= 0:
            break
    windows = wanted
    if not windows:
        raise SaeError("the corpus is too short: it needs at least two tokens")
    rows: list[Tensor] = []

    def grab(tensor: Tensor, hook: object) -> None:
        rows.append(tensor[0, 1:].detach().float().cpu())
        raise _Captured

    for done, w in enumerate(windows, 1):
        with contextlib.suppress(_Captured):  # the later layers are not needed
            llm.logits_with_hooks(w, [(hook, grab)])
        if progress is not None:
            progress("activations", done, len(windows))
    which = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])
    return torch.cat(rows)[:max_tokens], which[:max_tokens]


@dataclass(frozen=True)
class TrainedSae:
    """A trained SAE and how well it reconstructs the held-out windows."""

    sae: Sae
    explained_variance: float  # 1 − Σ‖x − x̂‖² / Σ‖x − mean‖² on held-out tokens
    l0: float  # mean number of active latents per held-out token
    train_tokens: int
    heldout_tokens: int
    steps: int
    seconds_per_step: float

    def to_dict(self) -> dict[str, object]:
        return {
            "hook": self.sae.hook,
            "architecture": self.sae.architecture,
            "d_in": self.sae.d_in,
            "d_sae": self.sae.d_sae,
            "k": self.sae.k,
            "steps": self.steps,
            "train_tokens": self.train_tokens,
            "heldout_tokens": self.heldout_tokens,
            "explained_variance": self.explained_variance,
            "l0": self.l0,
            "seconds_per_step": self.seconds_per_step,
        }


def evaluate(sae: Sae, x: Tensor) -> tuple[float, float]:
    """(explained variance, L0) of ``sae`` on states ``x`` [N, D]."""
    acts = sae.encode(x)
    error = (x - sae.decode(acts, sae.input_scale(x))).pow(2).sum()
    spread = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    return float(1 - error / spread), float((acts != 0).float().sum(-1).mean())


def train_sae(
    llm: TransparentLlm,
    layer: int,
    windows: Iterable[Sequence[int]],
    *,
    d_sae: int = 4096,
    k: int = 32,
    architecture: Architecture = "topk",
    l1: float = 5.0,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    max_tokens: int = 32768,
    seed: int = 0,
    progress: TrainProgress | None = None,
) -> TrainedSae:
    """Train an SAE on ``blocks.{layer}.hook_resid_post`` over the token ``windows`` of a
    corpus (see the module)."""
    if architecture not in ("topk", "standard"):
        raise SaeError(f"cannot train a {architecture!r} SAE; train 'topk' or 'standard'")
    if not 0 <= layer < llm.info.n_layers:
        raise SaeError(f"layer {layer} is outside 0..{llm.info.n_layers - 1}")
    for what, value, low in (("--d-sae", d_sae, 1), ("--steps", steps, 1), ("--k", k, 1)):
        if value < low:
            raise SaeError(f"{what} must be at least {low}, got {value}")
    if architecture == "topk" and k > d_sae:
        raise SaeError(f"--k ({k}) cannot exceed --d-sae ({d_sae})")
    hook = f"blocks.{layer}.hook_resid_post"
    x, which = residuals(llm, windows, hook, max_tokens=max_tokens, progress=progress)
    n_windows = int(which.max()) + 1
    heldout = which >= n_windows - max(n_windows // 10, 1) if n_windows > 1 else which < 0
    train, test = (x[~heldout], x[heldout]) if bool(heldout.any()) else (x, x)
    gen = torch.Generator().manual_seed(seed)
    d_in = train.shape[1]
    scale = d_in**0.5 / float(train.norm(dim=-1).mean())
    train = train * scale
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec = (W_dec / W_dec.norm(dim=-1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = train.mean(0).clone().requires_grad_()
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        batch = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)]
        pre = (batch - b_dec) @ W_enc + b_enc  # [B, d_sae]
        if architecture == "topk":
            top = pre.topk(k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        else:
            acts = pre.relu()
        loss = (acts @ W_dec + b_dec - batch).pow(2).sum(-1).mean()
        if architecture == "standard":
            loss = loss + l1 * (acts * W_dec.norm(dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if architecture == "topk":
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=-1, keepdim=True)
        if progress is not None:
            progress("training", step + 1, steps)
    per_step = (time.perf_counter() - start) / steps
    sae = Sae(
        hook=hook,
        architecture=architecture,
        W_enc=W_enc.detach() * scale,  # folded: the SAE reads unscaled residuals
        b_enc=b_enc.detach().clone(),
        W_dec=W_dec.detach() / scale,
        b_dec=b_dec.detach() / scale,
        apply_b_dec_to_input=True,
        k=k if architecture == "topk" else None,
        source=f"trained on {llm.info.name}",
    )
    ev, l0 = evaluate(sae, test)
    return TrainedSae(sae, ev, l0, len(train), len(test), steps, per_step)
