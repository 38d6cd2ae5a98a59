"""Stage 4, runner: the forward passes of a step.

`Runner` runs the whole model, or (prefix caching) only the layers from the first trained one,
with the states entering it cached; `original_weights` swaps the original values into the trained
tensors for a reference pass without a copy of the model; `align_forget` / `align_retain` move
labels and references to where the outputs came out (device_map models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.stack import DecoderStack
from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.errors import NotAnMoEModel
from moe_unlearn.unlearning.objectives import ObjectiveInputs
from moe_unlearn.unlearning.plan import decoder_layer_list
from moe_unlearn.unlearning.prefix_cache import PrefixCache
from moe_unlearn.unlearning.tensor import TrainedTensor


class Runner:
    """Forward passes for one step: the whole model, or (prefix caching) layers from `start` up.

    Returns logits (None when not needed) and the output of decoder layer `hidden_layer` (RMU)."""

    def __init__(self, model: nn.Module, *, start: int | None, cache_bytes: int, cache: bool,
                 hidden_layer: int | None, need_logits: bool) -> None:
        self.model = model
        self.hidden_layer = hidden_layer
        self.need_logits = need_logits
        self.stack = None
        if start is not None:
            try:
                self.stack = DecoderStack(model)
            except NotAnMoEModel:  # a layout the stack runner does not know: run the whole model
                start = None
        from moe_unlearn.sharding import is_fsdp2

        self.cache = PrefixCache(self.stack, start, max_bytes=cache_bytes, enabled=cache,
                                 sharded=is_fsdp2(model)) if self.stack else None
        self.start = start

    def __call__(self, key: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None,
                                                                          torch.Tensor | None]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.stack is not None:
            return self._from_prefix(key, ids, mask)
        grabbed: dict[str, torch.Tensor] = {}
        handle = None
        if self.hidden_layer is not None:
            layer = decoder_layer_list(self.model)[self.hidden_layer]
            handle = layer.register_forward_hook(
                lambda m, a, o: grabbed.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            if handle is not None:
                handle.remove()
        return logits, grabbed.get("h")

    def _from_prefix(self, key: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None,
                                                                                     torch.Tensor | None]:
        inp = self.stack.inputs(ids, mask)
        h = self.cache.get(key, ids, mask)
        hidden = None
        if self.hidden_layer is not None:
            h = self.stack.run(h, inp, start=self.start, stop=self.hidden_layer + 1)
            hidden = h
            if not self.need_logits:
                return None, hidden
            h = self.stack.run(h, inp, start=self.hidden_layer + 1)
        else:
            h = self.stack.run(h, inp, start=self.start)
        return self.stack.logits(h), hidden


@contextlib.contextmanager
def original_weights(model: nn.Module, tensors: Sequence[TrainedTensor],
                     originals: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily put the original values back into the trained tensors (reference forward passes
    without a copy of the model)."""
    params = canonical_parameters(model)
    saved = []
    with torch.no_grad():
        for t, orig in zip(tensors, originals, strict=True):
            view = t.view(params)
            saved.append((view, view.clone()))
            view.copy_(orig.to(view.device))
    try:
        yield
    finally:
        with torch.no_grad():
            for view, cur in saved:
                view.copy_(cur)


@torch.no_grad()
def restore_originals(model: nn.Module, tensors: Sequence[TrainedTensor], originals: Sequence[torch.Tensor]) -> None:
    """Write the original values back (a run that fails leaves the model as it was)."""
    params = canonical_parameters(model)
    for t, orig in zip(tensors, originals, strict=True):
        view = t.view(params)
        view.copy_(orig.to(view.device))


def align_forget(inp: ObjectiveInputs) -> None:
    """device_map: move labels, mask and references to where the outputs they meet came out
    (logits on the lm_head's device, RMU hidden states on that layer's device); a no-op on one device."""
    out = inp.forget_logits if inp.forget_logits is not None else inp.forget_hidden
    if out is None:
        return
    inp.forget_labels, inp.forget_mask = inp.forget_labels.to(out.device), inp.forget_mask.to(out.device)
    if inp.forget_ref_logp is not None:
        inp.forget_ref_logp = inp.forget_ref_logp.to(out.device)
    if inp.forget_ref_logits is not None:
        inp.forget_ref_logits = inp.forget_ref_logits.to(out.device)
    if inp.steering is not None and inp.forget_hidden is not None:
        inp.steering = inp.steering.to(inp.forget_hidden.device)


def align_retain(inp: ObjectiveInputs) -> None:
    """`align_forget` for the retain half."""
    out = inp.retain_logits if inp.retain_logits is not None else inp.retain_hidden
    if out is None:
        return
    inp.retain_labels, inp.retain_mask = inp.retain_labels.to(out.device), inp.retain_mask.to(out.device)
    if inp.retain_ref_logits is not None:
        inp.retain_ref_logits = inp.retain_ref_logits.to(out.device)


__all__ = ["Runner", "align_forget", "align_retain", "original_weights", "restore_originals"]
