"""Activation checkpointing of the decoder layers above every trained weight.

A one-expert run back-propagates through every layer above the target to reach it, and by
default keeps all their activations (attention, the MoE block's per-expert intermediates) for
the backward pass. With checkpointing those layers keep only their input hidden states and run
their forward again during backward: activation memory of the upper layers drops from
O(layers x activations per layer) to O(layers x B x S x H), at the cost of one more forward of
those layers per step. Gradients are the same (non-reentrant torch.utils.checkpoint; the layers
are deterministic in eval mode).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def checkpointed(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, calls of each module in `layers` run under activation checkpointing.

    The module's own forward hooks stay outside the checkpointed region (they run once)."""
    patched = []
    try:
        for layer in layers:
            inner = layer.forward
            layer.forward = functools.partial(checkpoint, inner, use_reentrant=False)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward
