""":class:`TransparentLlm` over TransformerLens 4's ``TransformerBridge`` (raw mode).

The bridge wraps an already-loaded Hugging Face model without touching its weights (no
compatibility mode, which rewrites them in place), so what runs is exactly the HF model. Masks,
rotary embeddings and sliding windows are never recomputed here: patterns come from the model's
own hooks.

A model dispatched over several devices (accelerate's ``device_map``) is wrapped as it is: the
bridge accepts it (TransformerLens 4 reads the placement from ``hf_device_map``), every captured
tensor is moved to the contribution device (see :mod:`llm_flow.models.dispatch`), and the
weights stay on their layers' devices.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from llm_flow.errors import PromptError, UnsupportedModelError
from llm_flow.models import capture_attention, qk
from llm_flow.models.base import (
    Hook,
    HookSite,
    LayerCallback,
    LayerRun,
    ModelInfo,
    ModelRun,
    TransparentLlm,
    at_weights,
)
from llm_flow.models.checks import check_layer
from llm_flow.models.dispatch import embedding_device, module_device, moved, place, weight_devices
from llm_flow.models.experts import MoeBlock, find_moe
from llm_flow.models.experts import unwrapped as _unwrapped
from llm_flow.models.plain import plain_model
from llm_flow.models.support import unsupported
from llm_flow.models.weights import layer_weights, norm_affine, output_folds

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
    "ffn": "hook_mlp_out",
}


class BridgeLlm(TransparentLlm):
    """A Hugging Face causal LM exposed through TransformerLens's ``TransformerBridge``.

    ``device`` is where runs are captured and contributions computed. A plain model is moved
    there (default: the CPU) and cast to ``dtype``; a model dispatched over devices stays where
    it is, in the dtype it was loaded in, and ``device`` defaults to its embedding's.
    """

    def __init__(
        self,
        name: str,
        hf_model: Any,
        tokenizer: Any,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        prepend_bos: bool | None = None,
        max_tokens: int | None = None,
    ) -> None:
        from transformer_lens.model_bridge import TransformerBridge

        self._name = name
        self._tokenizer = tokenizer
        self._prepend_bos = prepend_bos
        self._max_tokens = max_tokens
        hf_model, self._device = place(hf_model, device, dtype)
        # Token ids go where the embedding is, which with a device map need not be self._device.
        self._input_device = embedding_device(hf_model)
        # Counted before booting: the bridge registers split q/k/v copies of fused projections.
        n_params = sum(p.numel() for p in hf_model.parameters())
        devices = weight_devices(hf_model)
        # A dispatched model is never moved: the bridge takes its placement from hf_device_map.
        self._bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=str(self._device), dtype=dtype
        )
        self._check_hooks(hf_model.config)
        cfg = self._bridge.cfg
        # Hooks are attached to the shared modules for the length of a pass: two threads (app
        # sessions) running at once would see each other's hooks. One pass at a time per model.
        self._lock = threading.RLock()
        self._dtype = dtype
        self._n_layers = int(cfg.n_layers)
        self._post_norm = hasattr(self._bridge.blocks[0], "ln1_post")
        self._parallel = bool(cfg.parallel_attn_mlp)
        self._mla = hasattr(self._bridge.blocks[0].attn, "hook_kv_latent")
        self._centered_final_norm = str(cfg.normalization_type).upper().startswith("LN")
        d_model = int(cfg.d_model)
        self._final_gain, _ = norm_affine(self._bridge.ln_final, d_model, dtype, self._device)
        self._final_eps = float(getattr(self._bridge.ln_final, "eps", getattr(cfg, "eps", 1e-5)))
        hf_config = hf_model.config
        # Granite scales every block's update by a constant: folded into the output weights so
        # parts still sum to the whole.
        multiplier = float(getattr(hf_config, "residual_multiplier", 1.0) or 1.0)
        # Per block, what the attention and FFN outputs are multiplied by on their way into the
        # residual (post-norm gains, the residual multiplier), folded into the output weights.
        folds = [
            output_folds(
                block,
                d_model,
                post_norm=self._post_norm,
                multiplier=multiplier,
                dtype=dtype,
                device=self._device,
            )
            for block in self._bridge.blocks
        ]
        try:
            self._moe = {
                layer: MoeBlock(hf_mlp, experts, d_model, folds[layer][1])
                for layer in range(self._n_layers)
                if (experts := find_moe(hf_mlp := _unwrapped(self._bridge.blocks[layer].mlp)))
                is not None
            }
        except UnsupportedModelError as exc:
            raise unsupported(hf_config, str(exc)) from exc
        self._weights = [
            layer_weights(
                block,
                int(cfg.n_heads),
                d_model,
                folds[layer],
                experts=layer in self._moe,
                dtype=dtype,
                device=self._device,
            )
            for layer, block in enumerate(self._bridge.blocks)
        ]
        # Logits multiplied (Cohere's logit_scale) or divided (Granite's logits_scaling).
        logit_factor = float(getattr(hf_config, "logit_scale", 1.0) or 1.0) / float(
            getattr(hf_config, "logits_scaling", 1.0) or 1.0
        )
        # The unembedding is the one weight copied to the contribution device (when it is not
        # there already): every logit-lens reading multiplies by it.
        self._W_U = self._bridge.W_U.detach().to(self._device) * logit_factor
        b_U = torch.zeros_like(self._W_U[0]) if self._bridge.b_U is None else self._bridge.b_U
        self._b_U = b_U.detach().to(self._device) * logit_factor
        moe = next(iter(self._moe.values()), None)
        self._info = ModelInfo(
            name=name,
            architecture=str(cfg.architecture),
            n_params=n_params,
            n_layers=self._n_layers,
            n_heads=int(cfg.n_heads),
            n_kv_heads=int(cfg.n_key_value_heads or cfg.n_heads),
            d_model=d_model,
            d_head=int(self._weights[0]["W_O"].shape[1]),  # the value width (MLA: not Q/K's)
            d_mlp=int(cfg.d_mlp or 0),
            d_vocab=int(cfg.d_vocab),
            post_norm=self._post_norm,
            parallel_blocks=self._parallel,
            normalization=str(cfg.normalization_type),
            device=str(self._device),
            dtype=str(dtype).removeprefix("torch."),
            prepends_bos=self._adds_bos(),
            n_experts=0 if moe is None else moe.n_experts,
            experts_per_token=int(getattr(hf_config, "num_experts_per_tok", 0) or 0) if moe else 0,
            moe_layers=tuple(self._moe),
            weight_devices=devices,
        )

    def _check_hooks(self, config: Any) -> None:
        """Every layer must expose what a run captures, or the model cannot be decomposed."""
        names = self._hook_names()
        needed = ("hook_resid_pre", "hook_resid_post", "attn.hook_pattern", "attn.hook_v")
        for layer in range(int(self._bridge.cfg.n_layers)):
            if any(f"blocks.{layer}.{s}" not in names for s in needed):
                raise unsupported(
                    config, f"layers without softmax attention over tokens (layer {layer})"
                )

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
        moe = layer in self._moe
        if site == "experts":
            if not moe:
                raise ValueError(f"layer {layer} has a dense FFN: it has no experts to route")
            return _routing_name(layer)
        if site == "neurons" and moe:
            raise ValueError(f"layer {layer} is a mixture of experts: it has no dense neurons")
        return f"blocks.{layer}.{_SITE_HOOKS[site]}"

    @property
    def W_U(self) -> Tensor:
        return self._W_U

    @property
    def b_U(self) -> Tensor:
        return self._b_U

    def final_norm(self, resid: Tensor) -> Tensor:
        norm = self._bridge.ln_final
        with self._lock, torch.inference_mode():
            x = resid.to(device=module_device(norm, self._device), dtype=self._dtype)
            return norm(x).to(self._device)

    def final_norm_linear(self, update: Tensor, scale: Tensor) -> Tensor:
        x = update.to(device=self._device, dtype=torch.float32)
        if self._centered_final_norm:
            x = x - x.mean(-1, keepdim=True)
        return x * self._final_gain.float() / scale.to(x)[..., None]

    def run(
        self,
        prompt: str | Sequence[int],
        *,
        on_layer: LayerCallback | None = None,
        keep_patterns: bool = True,
        fwd_hooks: Sequence[Hook] = (),
    ) -> ModelRun:
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        tl_hooks, routing = self._split_hooks(fwd_hooks)
        # An intervention may replace a head's mixed values z; capture z to book what the
        # pattern does not explain as that token's bias (see _layer_run).
        layer_hooks = _LAYER_HOOKS | ({"z": _SITE_HOOKS["z"]} if fwd_hooks else {})
        captured: dict[int, dict[str, Tensor]] = {i: {} for i in range(self._n_layers)}
        final: dict[str, Tensor] = {}
        layers: list[LayerRun] = []

        def store(layer: int, key: str) -> Callable[[Tensor, Any], None]:
            def hook(tensor: Tensor, hook: Any) -> None:
                captured[layer][key] = moved(tensor[0], self._device)

            return hook

        def finish(layer: int) -> Callable[[Tensor, Any], None]:
            def hook(tensor: Tensor, hook: Any) -> None:
                captured[layer]["resid_post"] = moved(tensor[0], self._device)
                layer_run = self._layer_run(layer, captured.pop(layer), bool(fwd_hooks))
                check_layer(layer_run)
                if on_layer is not None:
                    on_layer(layer_run)
                layers.append(layer_run if keep_patterns else layer_run.without_pattern())

            return hook

        def final_scale(tensor: Tensor, hook: Any) -> None:
            final["scale"] = moved(tensor[0, :, 0], self._device)

        hook_names = self._hook_names()
        # Intervention hooks first: TransformerLens runs a hook point's hooks in the order they
        # were added, so the captures below see the activations the interventions wrote.
        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = list(tl_hooks)
        for layer in range(self._n_layers):
            for key, suffix in layer_hooks.items():
                name = f"blocks.{layer}.{suffix}"
                if key == "neuron_acts" and layer in self._moe:
                    continue  # an MoE block's hook_post is its output, not neurons
                if name in hook_names:
                    hook_fn = finish(layer) if key == "resid_post" else store(layer, key)
                    hooks.append((name, hook_fn))
        hooks.append(("ln_final.hook_scale", final_scale))
        # Interventions need TransformerLens's attention: a pattern edit must reach the output.
        logits = self._forward(
            token_ids, hooks, routing, grad=False, capture=True, blocked=not fwd_hooks
        )
        return ModelRun(
            model_name=self._name,
            token_ids=tuple(token_ids),
            tokens=tuple(self.token_strings(token_ids)),
            logits=logits[0].float(),
            layers=tuple(layers),
            final_scale=final["scale"].float(),
            patterns=functools.partial(self.attention_rows, token_ids, fwd_hooks=fwd_hooks),
        )

    def logits_with_hooks(
        self, token_ids: Sequence[int], fwd_hooks: Sequence[Hook], *, grad: bool = False
    ) -> Tensor:
        # Replacing hooks at every HookSite are checked by the ablation tests
        # (tests/unit/analyses/test_interventions.py: heads, neurons, edges, experts).
        tl_hooks, routing = self._split_hooks(fwd_hooks)
        logits = self._forward(list(token_ids), list(tl_hooks), routing, grad=grad, capture=False)
        return logits[0] if grad else logits[0].float()

    def _forward(
        self,
        token_ids: list[int],
        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]],
        routing: dict[int, Callable[[Tensor], Tensor | None]],
        *,
        grad: bool,
        capture: bool,
        blocked: bool = False,
    ) -> Tensor:
        """One pass; ``capture`` attaches what a run's MoE decomposition reads (else the MoE
        blocks are hooked only where ``routing`` intervenes); ``blocked`` runs the attention of
        :mod:`~llm_flow.models.capture_attention` where the model allows it."""
        tokens = torch.tensor([token_ids], device=self._input_device)
        with self._lock, ExitStack() as stack, warnings.catch_warnings():
            if grad:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
            else:
                stack.enter_context(torch.inference_mode())
            for layer, moe in self._moe.items():
                if capture or layer in routing:
                    for handle in moe.attach(routing.get(layer), capture=capture):
                        stack.callback(handle.remove)
            if blocked:
                stack.enter_context(capture_attention.capturing(self._bridge))
            # Said once, in words, by edits_pattern's callers: not per pass on stderr.
            warnings.filterwarnings("ignore", message=".*hook_pattern returned a modified tensor")
            logits: Tensor = self._bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        return logits.to(self._device)

    def qk_capture(self, token_ids: Sequence[int], layer: int) -> qk.QkCapture:
        with self._lock:
            return qk.capture(self._bridge, token_ids, layer, self._input_device, self._lock)

    @functools.cached_property
    def _plain(self) -> tuple[torch.nn.Module, str] | None:
        return plain_model(self._bridge.original_model)

    def plain_logits(self, token_ids: Sequence[int]) -> Tensor:
        if self._plain is None:  # e.g. split over devices: the bridge's pass without hooks
            return super().plain_logits(token_ids)
        tokens = torch.tensor([list(token_ids)], device=self._input_device)
        with self._lock, torch.inference_mode():
            return self._plain[0](tokens).logits[0].float().to(self._device)

    @property
    def plain_attention(self) -> str:
        plain = self._plain
        return super().plain_attention if plain is None else f"transformers, {plain[1]} attention"

    @functools.cache  # noqa: B019 (one probe per model; models live as long as the process)
    def edits_pattern(self) -> bool:
        # TransformerLens fires hook_pattern after the fact for attention it delegates to the
        # HF module, and discards edits: probe once with a pattern that attends nowhere.
        ids = self.tokenize_unchecked("a b")[:2] or [0, 0]
        nowhere = (self.hook_name("pattern", 0), lambda t, hook: torch.zeros_like(t))
        return not torch.equal(
            self.logits_with_hooks(ids, []), self.logits_with_hooks(ids, [nowhere])
        )

    def _hook_names(self) -> set[str]:
        return set(self._bridge.hook_dict)

    def _split_hooks(
        self, fwd_hooks: Sequence[Hook]
    ) -> tuple[list[Hook], dict[int, Callable[[Tensor], Tensor | None]]]:
        """TransformerLens hooks (z hooks of MLA layers see [T, H, d_head] like every other
        model's) and routing hooks of MoE layers (keyed by layer)."""
        known = self._hook_names()
        routing_layers = {_routing_name(layer): layer for layer in self._moe}
        routing = {
            routing_layers[name]: _routing_fn(fn)
            for name, fn in fwd_hooks
            if name in routing_layers
        }
        tl_hooks = [
            (name, self._z_view(fn) if self._mla and name.endswith(_SITE_HOOKS["z"]) else fn)
            for name, fn in fwd_hooks
            if name not in routing_layers
        ]
        unknown = sorted({name for name, _ in tl_hooks if name not in known})
        if unknown:
            raise ValueError(f"unknown hook name(s) {unknown}; e.g. 'blocks.0.attn.hook_z'")
        return tl_hooks, routing

    def _z_view(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        n_heads = self._info.n_heads

        def hook(tensor: Tensor, hook: Any) -> Tensor | None:
            # [B, T, H·d] (or split by the query width TransformerLens assumes) → [B, T, H, d]
            out = fn(tensor.flatten(2).unflatten(-1, (n_heads, -1)), hook)
            return None if out is None else out.flatten(2).view(tensor.shape)

        return hook

    def _layer_run(self, layer: int, act: dict[str, Tensor], intervened: bool) -> LayerRun:
        pattern = act["pattern"]
        n_heads = pattern.shape[0]
        values = qk.value_heads(act["values"], n_heads, latent=self._mla)  # [T, H, d_head]
        n_tokens = values.shape[0]
        ones = torch.ones(n_tokens, dtype=self._dtype, device=self._device)
        # Post-norm: update = x · g / rms(x); g is folded into the weights, 1/rms kept per token.
        attn_scale = 1 / act["attn_rms"][:, 0] if "attn_rms" in act else ones
        mlp_scale = 1 / act["mlp_rms"][:, 0] if "mlp_rms" in act else ones
        weights = dict(self._weights[layer])
        if "z" in act:  # an intervention ran: what z holds beyond Σ_s A v is written by no token
            z = act["z"].flatten(1).unflatten(-1, (n_heads, -1))  # MLA's z comes flat
            mixed = torch.einsum("hts,shk->thk", pattern, values)
            unexplained = at_weights((z - mixed).flatten(1), weights["W_O"].flatten(0, 1), z.dtype)
            weights["b_O"] = weights["b_O"] + unexplained
        experts, neuron_acts = None, act.get("neuron_acts")
        if layer in self._moe:
            experts = self._moe[layer].collect().to(self._device)
            neuron_acts = torch.zeros(n_tokens, 0, dtype=self._dtype, device=self._device)
            if intervened:  # e.g. a mean-ablated expert: its replacement is written by no part
                written = act["mlp_update"].float() / mlp_scale.float()[:, None]
                weights["b_out"] = (written - experts.total()).to(self._dtype)
        assert neuron_acts is not None  # dense blocks always fire mlp.hook_post
        return LayerRun(
            index=layer,
            resid_pre=act["resid_pre"],
            resid_mid=None if self._parallel else act["resid_mid"],
            resid_post=act["resid_post"],
            attn_update=act["attn_update"],
            mlp_update=act["mlp_update"],
            pattern=pattern,
            values=values,
            neuron_acts=neuron_acts,
            attn_scale=attn_scale,
            mlp_scale=mlp_scale,
            experts=experts,
            **weights,
        )


# The pseudo hook of an MoE layer's routing (see HookSite "experts"): not a TransformerLens hook
# point; BridgeLlm applies it to the router weights the experts module is called with.
_ROUTING = "mlp.experts.hook_routing"


def _routing_name(layer: int) -> str:
    return f"blocks.{layer}.{_ROUTING}"


def _routing_fn(fn: Callable[..., Any]) -> Callable[[Tensor], Tensor | None]:
    def routing(dense: Tensor) -> Tensor | None:
        out = fn(dense[None], None)  # the [1, T, E] layout of every other hook
        return None if out is None else out[0]

    return routing
