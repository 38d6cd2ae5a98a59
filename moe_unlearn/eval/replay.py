"""Routing replay: score a model with another model's routing forced at every MoE layer.

Unlearning an MoE model can hide knowledge by routing around the experts that hold it: the
forget EM drops while the weights that answer are untouched. Replay tells the two apart. The
original model's routing is recorded on the forget items (`record_routing`, or the recording
`evaluate` makes anyway); the unlearned model is then scored on the same items with, at every
MoE layer, its router's top-K indices replaced by the recorded ones. Gate values:

- gates="original": the recorded weights the original block applied (exactly its routing);
- gates="current": the unlearned router's own scores s (scores_from_logits) at the recorded
  experts, rescaled per token to the total weight the unlearned block gives its own top-K
  (w_k = s_k * sum(current top-K weights) / sum_j s_j; with renormalised top-K routing this
  is the renormalised current score over the recorded experts).

If the forget EM under replay comes back to near the original's, the forgetting was done by the
router, not by erasing. An untouched model replays to exactly its own scores.

How it is done: a forward hook on each router replaces the (logits, weights, indices) tuple
the block passes to its experts, token by token for the real tokens of the batch (padding keeps
the current routing). A forward pre-hook on the model finds which items the batch holds (items
are scored in order) and checks their token ids, so any batch size works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError, UnsupportedFamily
from moe_unlearn.eval.scoring import EncodedItem, RoutingRecording, ScoredSplit, fingerprint, score_encoded

REPLAY_GATES = ("original", "current")


class RoutingReplay:
    """Context manager forcing `recording`'s routing while `model` runs over `encoded` in order.

    with RoutingReplay(model, recording, encoded) as replay:
        scored = score_encoded(model, tok, encoded)
    replay.items_done == len(encoded)
    """

    def __init__(self, model: nn.Module, recording: RoutingRecording, encoded: Sequence[EncodedItem], *,
                 gates: str = "original") -> None:
        from moe_unlearn.arch import find_moe_layers

        if gates not in REPLAY_GATES:
            raise BadInputError(f"replay gates must be one of {', '.join(REPLAY_GATES)}, got {gates!r}")
        if recording.fingerprint != fingerprint(encoded):
            raise BadInputError("the routing recording was made on other tokens than the items to replay "
                                "(fingerprints differ); record it on the same data, tokenizer and prompt format")
        if gates == "original" and recording.topk_weight is None:
            raise BadInputError("this routing recording has no gate weights (topk_weight); record it again with "
                                "record_routing, or replay with gates='current'")
        self.layers = find_moe_layers(model)
        by_idx = {lay.layer_idx: lay for lay in self.layers}
        if sorted(by_idx) != recording.layers:
            raise BadInputError(f"the recording covers MoE layers {recording.layers}, the model has {sorted(by_idx)}")
        for lay in self.layers:
            _check_forceable(lay)
            k = recording.topk_idx[lay.layer_idx].shape[1]
            if k != lay.top_k or recording.num_experts[lay.layer_idx] != lay.num_experts:
                raise BadInputError(f"layer {lay.layer_idx}: the recording has top-{k} of "
                                    f"{recording.num_experts[lay.layer_idx]} experts, the model top-{lay.top_k} of "
                                    f"{lay.num_experts}")
        self.model, self.recording, self.encoded, self.gates = model, recording, list(encoded), gates
        offsets = [0]
        for n in recording.tokens_per_item:
            offsets.append(offsets[-1] + n)
        self._offsets = offsets
        self.items_done = 0
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows in the batch, rows in the recording)
        self._handles: list[Any] = []

    # -- hooks --------------------------------------------------------------------------------
    def _on_model_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.dim() != 2:
            raise BadInputError("routing replay needs input_ids [batch, seq] (inputs_embeds cannot be matched)")
        b, width = int(ids.shape[0]), int(ids.shape[1])
        start = self.items_done
        if start + b > len(self.encoded):
            raise BadInputError(f"routing replay: a forward pass of {b} sequences after {start} of "
                                f"{len(self.encoded)} items; the model ran on more data than was recorded")
        dst, src = [], []
        for j in range(b):
            item = self.encoded[start + j]
            n = len(item.ids)
            if n > width or ids[j, :n].tolist() != item.ids:
                raise BadInputError(f"routing replay: batch row {j} is not item {start + j} of the recording "
                                    "(items must be scored in the recorded order, right-padded)")
            dst.append(torch.arange(n) + j * width)
            src.append(torch.arange(n) + self._offsets[start + j])
        self._rows = (torch.cat(dst).to(ids.device), torch.cat(src))
        self.items_done = start + b

    def _router_hook(self, layer):
        idx_rec = self.recording.topk_idx[layer.layer_idx]
        w_rec = self.recording.topk_weight[layer.layer_idx] if self.recording.topk_weight is not None else None

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._rows is None:
                raise BadInputError("routing replay: a router ran outside a model forward pass")
            dst, src = self._rows
            return force_router_output(layer, output, dst, idx_rec[src],
                                       w_rec[src] if w_rec is not None else None, self.gates)
        return hook

    def __enter__(self) -> RoutingReplay:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
        for lay in self.layers:
            self._handles.append(lay.router.register_forward_hook(self._router_hook(lay), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._rows = None


def _check_forceable(layer: Any) -> None:
    from moe_unlearn.arch import MoELayer

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
            _check_forceable(lay)
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


def score_replayed(model: nn.Module, tokenizer: Any, encoded: Sequence[EncodedItem], recording: RoutingRecording,
                   *, gates: str = "original", batch_size: int = 16, progress: bool = False) -> ScoredSplit:
    """`score_encoded` of `encoded` with `recording`'s routing forced (see the module docstring)."""
    with RoutingReplay(model, recording, encoded, gates=gates) as replay:
        scored = score_encoded(model, tokenizer, encoded, batch_size=batch_size, progress=progress,
                               desc=f"replay ({gates} gates)")
    if replay.items_done != len(encoded):
        raise BadInputError(f"routing replay covered {replay.items_done} of {len(encoded)} items")
    return scored


__all__ = ["REPLAY_GATES", "ForcedRouting", "RoutingReplay", "force_router_output", "score_replayed"]
