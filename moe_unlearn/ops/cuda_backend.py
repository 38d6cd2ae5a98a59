"""Glue between loramoe_delta and the CUDA extension moe_unlearn._C (csrc/): allocation. Called by
moe_unlearn.ops.api only after dispatch checked that the extension is built and the tensors are on a CUDA device."""

from __future__ import annotations

import torch

from moe_unlearn.ops.dispatch import cuda_extension


def loramoe_delta_cuda(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, *, scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward only (dispatch never sends a call that needs gradients here)."""
    ext = cuda_extension()
    T = x.shape[0]
    E, r, _ = A.shape
    h = torch.empty((T, E * r), dtype=torch.float32, device=x.device)
    g32 = gates.float()
    if out is not None and out.dtype == x.dtype:
        ext.loramoe_delta_forward(x, A, B, g32, float(scale), h, out, True)
        return out
    delta = torch.empty((T, B.shape[1]), dtype=x.dtype, device=x.device)
    ext.loramoe_delta_forward(x, A, B, g32, float(scale), h, delta, False)
    return delta if out is None else out.add_(delta)
