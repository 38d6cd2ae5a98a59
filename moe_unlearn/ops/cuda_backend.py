"""Glue between the ops and the CUDA extension moe_unlearn._C (csrc/): allocation, sorting by
sequence, offsets and fixed-order sums of partials. Called by moe_unlearn.ops.api only after
dispatch checked that the extension is built and the tensors are on a CUDA device."""

from __future__ import annotations

import torch

from moe_unlearn.ops.dispatch import cuda_extension
from moe_unlearn.ops.routing_stats import RoutingStats, empty_routing_stats

# Tokens one warp walks in the routing kernel: long enough that the per-warp partials stay small next
# to the logits (E floats per 256 tokens), short enough to keep ~100K warps busy at T = 1M.
WARP_CHUNK = 256


def routing_stats_cuda(
    logits: torch.Tensor,
    *,
    top_k: int,
    seq_ids: torch.Tensor,
    num_seqs: int,
    mask: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    router_weight: torch.Tensor | None = None,
    router_bias: torch.Tensor | None = None,
    score_fn: str = "softmax",
    return_topk: bool = False,
    seq_sorted: bool | None = None,
) -> RoutingStats:
    ext = cuda_extension()
    device = logits.device
    T, E = logits.shape
    S = num_seqs
    K = topk_idx.shape[1] if topk_idx is not None else top_k
    gate_sum = torch.empty((S, E), dtype=torch.float32, device=device)
    tokens = torch.empty((S,), dtype=torch.int64, device=device)
    idx_out = torch.empty((T, K), dtype=torch.int64, device=device) if return_topk and topk_idx is None else None
    if T == 0:
        return empty_routing_stats(gate_sum, tokens, E,
                                   idx_out if idx_out is not None else (topk_idx if return_topk else None))
    seq = seq_ids.to(torch.int32)
    perm = None
    if seq_sorted is None:
        seq_sorted = T <= 1 or bool((seq[1:] >= seq[:-1]).all())
    if not seq_sorted:
        seq, perm = torch.sort(seq, stable=True)
        perm = perm.to(torch.int32)
    seq = seq.contiguous()
    starts = torch.searchsorted(seq, torch.arange(S + 1, dtype=torch.int32, device=device)).to(torch.int64)
    n_warps = -(-T // WARP_CHUNK)
    slot_gate = torch.empty((n_warps + S, E), dtype=torch.float32, device=device)
    slot_tok = torch.empty((n_warps + S,), dtype=torch.int32, device=device)
    part_score = torch.empty((n_warps, E), dtype=torch.float32, device=device)
    part_count = torch.empty((n_warps, E), dtype=torch.int32, device=device)
    ext.routing_stats_pass(
        logits, perm, seq, mask.to(torch.uint8).contiguous() if mask is not None else None,
        topk_idx.long().contiguous() if topk_idx is not None else None, idx_out, K, score_fn == "sigmoid",
        slot_gate, slot_tok, part_score, part_count, WARP_CHUNK, n_warps)
    if S > 0:
        ext.routing_stats_reduce(slot_gate, slot_tok, starts, WARP_CHUNK, gate_sum, tokens)
    out_idx = None
    if return_topk:
        out_idx = idx_out if idx_out is not None else topk_idx
    return RoutingStats(gate_sum, part_count.sum(0, dtype=torch.int64), part_score.sum(0), tokens, out_idx)


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
