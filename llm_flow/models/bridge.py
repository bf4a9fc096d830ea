""":class:`TransparentLlm` over TransformerLens 4's ``TransformerBridge`` (raw mode).

The bridge wraps an already-loaded Hugging Face model without touching its weights (no
compatibility mode, which rewrites them in place), so what runs is exactly the HF model. Masks,
rotary embeddings and sliding windows are never recomputed here: patterns come from the model's
own hooks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from llm_flow.errors import PromptError
from llm_flow.models.base import (
    Hook,
    HookSite,
    LayerCallback,
    LayerRun,
    ModelInfo,
    ModelRun,
    TransparentLlm,
)
from llm_flow.models.checks import check_layer

# The hooks a run captures, per layer (key → hook name suffix after ``blocks.{l}.``).
_LAYER_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_update": "hook_attn_out",
    "mlp_update": "hook_mlp_out",
    "pattern": "attn.hook_pattern",
    "values": "attn.hook_v",
    "neuron_acts": "mlp.hook_post",
    "attn_rms": "ln1_post.hook_scale",
    "mlp_rms": "ln2_post.hook_scale",
}
# TransformerLens's hook of each site analyses may intervene on (after ``blocks.{l}.``).
_SITE_HOOKS: dict[HookSite, str] = {
    "z": "attn.hook_z",
    "pattern": "attn.hook_pattern",
    "neurons": "mlp.hook_post",
}


def _norm_affine(module: Any, d_model: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Gain and bias of a LayerNorm/RMSNorm-like module, read off its behaviour.

    Probing with x = (+1, −1, +1, …) — mean 0, mean square 1 — gives norm(±x) = ±x·g/√(1+ε) + b,
    whatever the class stores (``w``, ``1 + w`` for Gemma, a bias or not).
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even to probe the norm, got {d_model}")
    eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))
    device = next(module.parameters()).device
    x = torch.ones(d_model, dtype=dtype, device=device)
    x[1::2] = -1
    with torch.no_grad():
        plus, minus = module(x[None].clone())[0], module(-x[None])[0]
    gain = (plus - minus).double() / (2 * x.double()) * math.sqrt(1 + eps)
    bias = (plus + minus).double() / 2
    return gain.to(dtype), bias.to(dtype)


class BridgeLlm(TransparentLlm):
    """A Hugging Face causal LM exposed through TransformerLens's ``TransformerBridge``."""

    def __init__(
        self,
        name: str,
        hf_model: Any,
        tokenizer: Any,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prepend_bos: bool | None = None,
        max_tokens: int | None = None,
    ) -> None:
        from transformer_lens.model_bridge import TransformerBridge

        self._name = name
        self._tokenizer = tokenizer
        self._prepend_bos = prepend_bos
        self._max_tokens = max_tokens
        hf_model = hf_model.to(device=device, dtype=dtype)
        # Counted before booting: the bridge registers split q/k/v copies of fused projections.
        n_params = sum(p.numel() for p in hf_model.parameters())
        self._bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=dtype
        )
        cfg = self._bridge.cfg
        self._device = torch.device(device)
        # Hooks are attached to the shared modules for the length of a pass: two threads (app
        # sessions) running at once would see each other's hooks. One pass at a time per model.
        self._lock = threading.RLock()
        self._dtype = dtype
        self._n_layers = int(cfg.n_layers)
        self._post_norm = hasattr(self._bridge.blocks[0], "ln1_post")
        self._parallel = bool(cfg.parallel_attn_mlp)
        self._centered_final_norm = str(cfg.normalization_type).upper().startswith("LN")
        d_model = int(cfg.d_model)
        self._final_gain, _ = _norm_affine(self._bridge.ln_final, d_model, dtype)
        self._final_eps = float(getattr(self._bridge.ln_final, "eps", getattr(cfg, "eps", 1e-5)))
        self._weights = [self._layer_weights(layer, d_model) for layer in range(self._n_layers)]
        self._W_U = self._bridge.W_U.detach()
        b_U = self._bridge.b_U
        self._b_U = torch.zeros_like(self._W_U[0]) if b_U is None else b_U.detach()
        self._info = ModelInfo(
            name=name,
            architecture=str(cfg.architecture),
            n_params=n_params,
            n_layers=self._n_layers,
            n_heads=int(cfg.n_heads),
            n_kv_heads=int(cfg.n_key_value_heads or cfg.n_heads),
            d_model=d_model,
            d_head=int(cfg.d_head),
            d_mlp=int(cfg.d_mlp or 0),
            d_vocab=int(cfg.d_vocab),
            post_norm=self._post_norm,
            parallel_blocks=self._parallel,
            normalization=str(cfg.normalization_type),
            device=str(self._device),
            dtype=str(dtype).removeprefix("torch."),
            prepends_bos=self._adds_bos(),
        )

    def _layer_weights(self, layer: int, d_model: int) -> dict[str, Tensor]:
        block = self._bridge.blocks[layer]
        W_O = block.attn.W_O.detach()  # [H, d_head, D]
        W_out = block.mlp.W_out.detach()  # [d_mlp, D]
        zeros = torch.zeros(d_model, dtype=self._dtype, device=self._device)
        b_O = zeros if block.attn.b_O is None else block.attn.b_O.detach()
        b_out = zeros if block.mlp.b_out is None else block.mlp.b_out.detach()
        if self._post_norm:
            # The post-norm's gain is linear per dimension: fold it into the output weights.
            g_attn, _ = _norm_affine(block.ln1_post, d_model, self._dtype)
            g_mlp, _ = _norm_affine(block.ln2_post, d_model, self._dtype)
            W_O, b_O = W_O * g_attn, b_O * g_attn
            W_out, b_out = W_out * g_mlp, b_out * g_mlp
        return {"W_O": W_O, "b_O": b_O, "W_out": W_out, "b_out": b_out}

    # -- TransparentLlm -------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _adds_bos(self) -> bool:
        bos = self._tokenizer.bos_token_id
        return bos is not None and self.tokenize_unchecked("a")[:1] == [bos]

    def tokenize_unchecked(self, prompt: str) -> list[int]:
        ids: list[int] = list(self._tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = self._tokenizer.bos_token_id
        if self._prepend_bos is True and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        elif self._prepend_bos is False and bos is not None and ids[:1] == [bos]:
            ids = ids[1:]
        return ids

    def tokenize(self, prompt: str) -> list[int]:
        if not prompt.strip():
            raise PromptError("the prompt is empty; type some text to analyse")
        ids = self.tokenize_unchecked(prompt)
        if not ids:
            raise PromptError("the prompt produced no tokens; type some text to analyse")
        if self._max_tokens is not None and len(ids) > self._max_tokens:
            raise PromptError(
                f"the prompt has {len(ids)} tokens, more than this model's context of "
                f"{self._max_tokens}; shorten it"
            )
        return ids

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [self._tokenizer.decode([i]) for i in token_ids]

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(token_ids))
        return text

    def hook_name(self, site: HookSite, layer: int) -> str:
        if not 0 <= layer < self._n_layers:
            raise ValueError(f"layer {layer} is outside 0..{self._n_layers - 1}")
        return f"blocks.{layer}.{_SITE_HOOKS[site]}"

    @property
    def W_U(self) -> Tensor:
        return self._W_U

    @property
    def b_U(self) -> Tensor:
        return self._b_U

    def final_norm(self, resid: Tensor) -> Tensor:
        with self._lock, torch.inference_mode():
            return self._bridge.ln_final(resid.to(device=self._device, dtype=self._dtype))

    def final_norm_linear(self, update: Tensor, scale: Tensor) -> Tensor:
        x = update.to(device=self._device, dtype=torch.float32)
        if self._centered_final_norm:
            x = x - x.mean(-1, keepdim=True)
        return x * self._final_gain.float() / scale.to(x)[..., None]

    def run(
        self,
        prompt: str,
        *,
        on_layer: LayerCallback | None = None,
        keep_patterns: bool = True,
        fwd_hooks: Sequence[Hook] = (),
    ) -> ModelRun:
        token_ids = self.tokenize(prompt)
        self._check_hook_names(fwd_hooks)
        # An intervention may replace a head's mixed values z; capture z to book what the
        # pattern does not explain as that token's bias (see _layer_run).
        layer_hooks = _LAYER_HOOKS | ({"z": _SITE_HOOKS["z"]} if fwd_hooks else {})
        captured: dict[int, dict[str, Tensor]] = {i: {} for i in range(self._n_layers)}
        final: dict[str, Tensor] = {}
        layers: list[LayerRun] = []

        def store(layer: int, key: str) -> Callable[[Tensor, Any], None]:
            def hook(tensor: Tensor, hook: Any) -> None:
                captured[layer][key] = tensor[0].detach()

            return hook

        def finish(layer: int) -> Callable[[Tensor, Any], None]:
            def hook(tensor: Tensor, hook: Any) -> None:
                captured[layer]["resid_post"] = tensor[0].detach()
                layer_run = self._layer_run(layer, captured.pop(layer))
                check_layer(layer_run)
                if on_layer is not None:
                    on_layer(layer_run)
                layers.append(layer_run if keep_patterns else layer_run.without_pattern())

            return hook

        def final_scale(tensor: Tensor, hook: Any) -> None:
            final["scale"] = tensor[0, :, 0].detach()

        hook_names = self._hook_names()
        # Intervention hooks first: TransformerLens runs a hook point's hooks in the order they
        # were added, so the captures below see the activations the interventions wrote.
        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = list(fwd_hooks)
        for layer in range(self._n_layers):
            for key, suffix in layer_hooks.items():
                name = f"blocks.{layer}.{suffix}"
                if name in hook_names:
                    hook_fn = finish(layer) if key == "resid_post" else store(layer, key)
                    hooks.append((name, hook_fn))
        hooks.append(("ln_final.hook_scale", final_scale))
        tokens = torch.tensor([token_ids], device=self._device)
        with self._lock, torch.inference_mode():
            logits = self._bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        return ModelRun(
            model_name=self._name,
            token_ids=tuple(token_ids),
            tokens=tuple(self.token_strings(token_ids)),
            logits=logits[0].float(),
            layers=tuple(layers),
            final_scale=final["scale"].float(),
        )

    def logits_with_hooks(
        self, token_ids: Sequence[int], fwd_hooks: Sequence[Hook], *, grad: bool = False
    ) -> Tensor:
        # Replacing hooks at every HookSite are checked by the ablation tests
        # (tests/unit/analyses/test_interventions.py: heads, neurons, edges).
        self._check_hook_names(fwd_hooks)
        tokens = torch.tensor([list(token_ids)], device=self._device)
        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = list(fwd_hooks)
        if grad:
            with self._lock, torch.inference_mode(False), torch.enable_grad():
                logits: Tensor = self._bridge.run_with_hooks(tokens, fwd_hooks=hooks)
            return logits[0]
        with self._lock, torch.inference_mode():
            logits = self._bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        return logits[0].float()

    def _hook_names(self) -> set[str]:
        return set(self._bridge.hook_dict)

    def _check_hook_names(self, fwd_hooks: Sequence[Hook]) -> None:
        known = self._hook_names()
        unknown = sorted({name for name, _ in fwd_hooks if name not in known})
        if unknown:
            raise ValueError(f"unknown hook name(s) {unknown}; e.g. 'blocks.0.attn.hook_z'")

    def _layer_run(self, layer: int, act: dict[str, Tensor]) -> LayerRun:
        pattern = act["pattern"]
        n_heads = pattern.shape[0]
        values = act["values"]  # [T, n_kv_heads, d_head]
        if values.shape[1] != n_heads:  # grouped-query attention: K/V heads are shared
            values = values.repeat_interleave(n_heads // values.shape[1], dim=1)
        n_tokens = values.shape[0]
        ones = torch.ones(n_tokens, dtype=self._dtype, device=self._device)
        # Post-norm: update = x · g / rms(x); g is folded into the weights, 1/rms kept per token.
        attn_scale = 1 / act["attn_rms"][:, 0] if "attn_rms" in act else ones
        mlp_scale = 1 / act["mlp_rms"][:, 0] if "mlp_rms" in act else ones
        weights = self._weights[layer]
        if "z" in act:  # an intervention ran: what z holds beyond Σ_s A v is written by no token
            mixed = torch.einsum("hts,shk->thk", pattern, values)
            unexplained = torch.einsum("thk,hkd->td", act["z"] - mixed, weights["W_O"])
            weights = weights | {"b_O": weights["b_O"] + unexplained}
        return LayerRun(
            index=layer,
            resid_pre=act["resid_pre"],
            resid_mid=None if self._parallel else act["resid_mid"],
            resid_post=act["resid_post"],
            attn_update=act["attn_update"],
            mlp_update=act["mlp_update"],
            pattern=pattern,
            values=values,
            neuron_acts=act["neuron_acts"],
            attn_scale=attn_scale,
            mlp_scale=mlp_scale,
            **weights,
        )
