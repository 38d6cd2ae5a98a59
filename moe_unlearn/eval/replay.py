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

How it is done (the forcing is `moe_unlearn.arch.forcing`'s, shared with training under routing="forced"):
a forward hook on each router replaces the (logits, weights, indices) tuple
the block passes to its experts, token by token for the real tokens of the batch (padding keeps
the current routing). A forward pre-hook on the model finds which items the batch holds (items
are scored in order) and checks their token ids, so any batch size works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.forcing import check_forceable, force_router_output
from moe_unlearn.errors import BadInputError
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
            check_forceable(lay)
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


def score_replayed(model: nn.Module, tokenizer: Any, encoded: Sequence[EncodedItem], recording: RoutingRecording,
                   *, gates: str = "original", batch_size: int = 16, progress: bool = False) -> ScoredSplit:
    """`score_encoded` of `encoded` with `recording`'s routing forced (see the module docstring)."""
    with RoutingReplay(model, recording, encoded, gates=gates) as replay:
        scored = score_encoded(model, tokenizer, encoded, batch_size=batch_size, progress=progress,
                               desc=f"replay ({gates} gates)")
    if replay.items_done != len(encoded):
        raise BadInputError(f"routing replay covered {replay.items_done} of {len(encoded)} items")
    return scored


__all__ = ["REPLAY_GATES", "RoutingReplay", "score_replayed"]
