"""loramoe_delta: the routed mixture of LoRA experts, sum_e g_e(x) * scale * B_e A_e x.

Contract and plain torch references (the ground truth for the Triton/CUDA backends).
The public entry point with backend dispatch is `moe_unlearn.ops.loramoe_delta`.

Shapes: x [T, d_in], A [E, r, d_in], B [E, d_out, r]; gates either dense [T, E] or
top-K (idx [T, K] int64, weight [T, K]). Uses the identity
    sum_i g_i B_i A_i x = B_cat ((g (x) 1_r) * (A_stack x)),
A_stack [E*r, d_in], B_cat [d_out, E*r], so the mixture is two GEMMs and one gate.
"""

from __future__ import annotations

import torch


def dense_gates(num_experts: int, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """[T, K] top-K routing -> [T, E] dense gates (0 for unselected experts); differentiable in the weights."""
    zeros = torch.zeros(topk_idx.shape[0], num_experts, dtype=topk_weight.dtype, device=topk_weight.device)
    return zeros.scatter(1, topk_idx, topk_weight)


def loramoe_delta_torch(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor | None = None,
    *,
    topk_idx: torch.Tensor | None = None,
    topk_weight: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Stacked two-GEMM formulation (the best plain-torch one). Returns [T, d_out] in x's dtype."""
    E, r, d_in = A.shape
    d_out = B.shape[1]
    if gates is None:
        if topk_idx is None or topk_weight is None:
            raise ValueError("loramoe_delta needs dense gates [T, E] or topk_idx and topk_weight [T, K]")
        gates = dense_gates(E, topk_idx, topk_weight)
    h = x @ A.reshape(E * r, d_in).t()  # [T, E*r]
    h = h * gates.to(h.dtype).repeat_interleave(r, dim=1)
    b_cat = B.permute(1, 0, 2).reshape(d_out, E * r)
    return (h @ b_cat.t()) * scale


def loramoe_delta_loop(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """The per-expert Python loop as the LoRAMoE reference code does it (benchmark baseline only)."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(A.shape[0]):
        out = out + gates[:, e : e + 1].to(x.dtype) * ((x @ A[e].t()) @ B[e].t()) * scale
    return out
