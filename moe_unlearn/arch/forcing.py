"""Forcing an MoE model's routing: given top-K experts and gate weights replace what its routers chose.

One mechanism for two uses: routing replay in evaluation (`moe_unlearn.eval.replay`: the original
model's routing forced on the unlearned one, item by item) and training with routing="forced"
(`ForcedRouting`: each batch's original routing forced in every training pass). A forward hook on a
router replaces the (logits, weights, indices) tuple the block passes to its experts; the logits are
returned untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError, UnsupportedFamily


def check_forceable(layer: Any) -> None:
    from moe_unlearn.arch.base import MoELayer

    if type(layer).unpack_router_output is not MoELayer.unpack_router_output:
        raise UnsupportedFamily(f"{layer.family} layer {layer.layer_idx}: its router returns logits only and the "
                                "block routes them itself; routing replay or forcing cannot replace its decisions")


def force_router_output(layer: Any, output: Any, dst: torch.Tensor, forced_idx: torch.Tensor,
                        forced_w: torch.Tensor | None, gates: str = "original") -> tuple:
    """The router's (logits, weights, indices, ...) output with rows `dst` (flattened tokens) routed to
    `forced_idx` [len(dst), K]: gates "original" apply `forced_w`, "current" the router's own scores at
    those experts (see the module docstring). The logits are returned untouched (losses on them keep
    their graph); the one place routing is forced, for replay and for training (routing="forced")."""
    if not isinstance(output, tuple) or len(output) < 3:
        raise UnsupportedFamily(f"{layer.family} layer {layer.layer_idx}: the router does not return "
                                "(logits, weights, indices); its decisions cannot be replaced")
    logits, weight, idx = output[0], output[1], output[2]
    if idx.dim() != 2 or idx.shape[1] != forced_idx.shape[1] or weight.shape != idx.shape:
        raise BadInputError(f"layer {layer.layer_idx}: router returned indices {tuple(idx.shape)} and "
                            f"weights {tuple(weight.shape)}; expected [tokens, {forced_idx.shape[1]}]")
    if len(dst) and int(dst.max()) >= idx.shape[0]:
        raise BadInputError(f"layer {layer.layer_idx}: router saw {idx.shape[0]} tokens, fewer than the batch")
    forced = forced_idx.to(idx.device, idx.dtype)
    new_idx = idx.clone()
    new_idx[dst] = forced
    new_w = weight.clone()
    if gates == "original":
        new_w[dst] = forced_w.to(weight.device, weight.dtype)
    else:
        scores = layer.scores_from_logits(logits.reshape(-1, logits.shape[-1]))[dst]
        s = scores.gather(1, forced)
        mass = weight[dst].float().sum(-1, keepdim=True)
        new_w[dst] = (s * mass / s.sum(-1, keepdim=True).clamp_min(1e-12)).to(weight.dtype)
    return (logits, new_w, new_idx, *output[3:])


class ForcedRouting:
    """Context manager forcing given top-K indices and gate weights at every MoE layer it holds, for
    whole padded batches (training with routing="forced"): `use(routing)` sets {layer: (indices [T, K],
    weights [T, K])} for the next forward pass (T = batch * seq, every position); a router whose layer
    has no entry, or that runs while none is set, is refused rather than left free."""

    def __init__(self, layers: Sequence[Any]) -> None:
        for lay in layers:
            check_forceable(lay)
        self.layers = list(layers)
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles: list[Any] = []

    def use(self, routing: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        self.routing = routing

    def _hook(self, layer: Any):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self.routing is None:
                raise BadInputError(f"forced routing: layer {layer.layer_idx}'s router ran with no routing set")
            if layer.layer_idx not in self.routing:
                raise BadInputError(f"forced routing: no recorded routing for layer {layer.layer_idx}")
            idx, w = self.routing[layer.layer_idx]
            n = output[2].shape[0] if isinstance(output, tuple) and len(output) >= 3 else -1
            if n != idx.shape[0]:
                raise BadInputError(f"forced routing: layer {layer.layer_idx} routes {n} tokens, the recording "
                                    f"holds {idx.shape[0]} (not the same batch)")
            dst = torch.arange(n, device=output[2].device)
            return force_router_output(layer, output, dst, idx, w, "original")
        return hook

    def __enter__(self) -> ForcedRouting:
        for lay in self.layers:
            self._handles.append(lay.router.register_forward_hook(self._hook(lay), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.routing = None


__all__ = ["ForcedRouting", "check_forceable", "force_router_output"]
