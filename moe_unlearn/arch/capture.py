"""Record routing during an ordinary forward pass, with forward hooks only.

Hooks (not module replacement) keep the model's own outputs bit-identical and keep
transformers' OutputRecorder, which is keyed on the router class, working.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_unlearn.arch.base import MoELayer, Routing


@dataclass
class RouterRecord:
    """What one MoE layer's router saw and returned in one forward pass (tokens flattened, T = B*S)."""

    logits: torch.Tensor  # [T, E] as returned by the router
    topk_weight: torch.Tensor  # [T, K]
    topk_idx: torch.Tensor  # [T, K]
    hidden: torch.Tensor | None = None  # [T, H] block input, only with hidden_states=True

    def routing(self, layer: MoELayer) -> Routing:
        return Routing(scores=layer.scores_from_logits(self.logits), topk_idx=self.topk_idx,
                       topk_weight=self.topk_weight.float())


@dataclass
class ForwardRecord:
    """One forward pass of the model: the token mask and every captured layer's record."""

    mask: torch.Tensor | None  # [T] bool, True = real token; None until a forward pre-hook saw the inputs
    shape: tuple[int, int] | None  # (batch, seq)
    layers: dict[int, RouterRecord] = field(default_factory=dict)


class RoutingCapture:
    """Context manager recording router outputs (and optionally block inputs) of MoE layers.

    with RoutingCapture(model, layers) as cap:
        model(**batch)
    rec = cap.records[-1]            # ForwardRecord of that call
    rec.layers[layer_idx].logits     # [B*S, E]
    rec.mask                         # [B*S] bool, padding = False

    detach=False keeps the autograd graph (for losses on routing, e.g. the router anchor).
    """

    def __init__(self, model: nn.Module, layers: list[MoELayer] | None = None, *, hidden_states: bool = False,
                 detach: bool = True) -> None:
        if layers is None:
            from moe_unlearn.arch.discovery import find_moe_layers

            layers = find_moe_layers(model)
        self.model = model
        self.layers = list(layers)
        self.hidden_states = hidden_states
        self.detach = detach
        self.records: list[ForwardRecord] = []
        self._handles: list = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def _on_model_input(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        mask = kwargs.get("attention_mask")
        shape = (int(ref.shape[0]), int(ref.shape[1])) if ref is not None else None
        flat = None
        if shape is not None:
            if mask is not None and mask.dim() == 2:
                flat = mask[:, -shape[1]:].reshape(-1).bool()
            else:
                flat = torch.ones(shape[0] * shape[1], dtype=torch.bool, device=ref.device)
        self.records.append(ForwardRecord(mask=flat, shape=shape))

    def _router_hook(self, layer: MoELayer):
        def hook(module, args, kwargs, output):
            if not self.records:  # router called outside a model forward (e.g. layer.route())
                self.records.append(ForwardRecord(mask=None, shape=None))
            # routers differ in what they return (DBRX: logits only); the adapter normalises it
            logits, weight, idx = layer.unpack_router_output(output)
            hidden = None
            if self.hidden_states:
                h = args[0] if args else next(iter(kwargs.values()))
                hidden = self._keep(h.reshape(-1, h.shape[-1]))
            self.records[-1].layers[layer.layer_idx] = RouterRecord(
                self._keep(logits.reshape(-1, logits.shape[-1])), self._keep(weight), idx.detach(), hidden)
        return hook

    def __enter__(self) -> RoutingCapture:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.records.clear()

    @property
    def last(self) -> ForwardRecord:
        return self.records[-1]
