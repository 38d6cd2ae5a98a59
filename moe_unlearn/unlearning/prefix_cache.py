"""Cache of the hidden states entering the first trained layer, per batch.

When every trained weight sits in decoder layers >= l, the states entering layer l are the
same at every step (the batches are fixed), so they are computed once (no autograd graph)
and each step runs only layers l and up. Memory is bounded: batches beyond `max_bytes` are
recomputed each time (still without a graph through the prefix).

On a model sharded with FSDP2 every prefix computation gathers each layer from all the ranks, so
the ranks must compute together: a batch is taken from the cache only when it is cached on every
rank (one small all-reduce per lookup); otherwise all of them recompute it.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from moe_unlearn.arch.stack import DecoderStack


class PrefixCache:
    def __init__(self, stack: DecoderStack, start: int, *, max_bytes: int = 1 << 30, enabled: bool = True,
                 sharded: bool = False) -> None:
        self.stack = stack
        self.sharded = sharded
        self.start = start
        self.max_bytes = max_bytes
        self.enabled = enabled
        self._store: dict[Hashable, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0

    def get(self, key: Hashable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, S, H] hidden states entering layer `start` for the batch named `key`."""
        hit = self._store.get(key)
        if self.sharded:  # a hit counts only when every rank hits (FSDP2 gathers in step)
            from moe_unlearn.distributed import all_reduce_

            misses = all_reduce_(torch.tensor([float(hit is None)], dtype=torch.float64))
            if misses.item() > 0 and hit is not None:
                self.stack.hidden_entering(self.start, input_ids, attention_mask)  # the others' gathers; same values
                return hit
        if hit is not None:
            self.hits += 1
            return hit
        hidden = self.stack.hidden_entering(self.start, input_ids, attention_mask)
        size = hidden.numel() * hidden.element_size()
        if self.enabled and self.bytes + size <= self.max_bytes:
            self._store[key] = hidden
            self.bytes += size
        return hidden

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0
