"""Triton routing_stats: one pass over the tokens, no [T, E] probabilities in memory.

Each program walks a contiguous chunk of tokens (tiles of BLOCK_T) in sequence-id
order and, per tile: loads the logits (or computes them with the router GEMM
fused), applies softmax or sigmoid, picks the top-K (or takes the given indices)
and accumulates in registers. Nothing is summed with atomics, so results are
bit-for-bit reproducible:

- score sums and selection counts: one row of partials per program, summed by
  torch in a fixed order afterwards;
- per-sequence gate sums: tokens are visited sorted by sequence id (a stable
  permutation is applied when the ids are not already sorted), so program `p`
  touches sequences s in a non-decreasing run and owns the "slot" p + s of a
  [programs + S, E] buffer exclusively (slots of consecutive programs never
  collide because p + s grows strictly from one program to the next). A second
  kernel sums, for each sequence, the slots of the programs that saw it, in
  program order (finding the sequence's token range by binary search), and the
  score / count partials.

No host sync when the caller says the ids are sorted; graph-capturable then.

Cost note: a tile loops once per distinct sequence it contains, so very short
sequences (much shorter than BLOCK_T) cost more compute; the memory traffic stays
one read of the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moe_unlearn.kernels._common import (
    check_launchable,
    device_guard,
    dot_in_fp32,
    interpreting,
    new_empty,
    sm_count,
)

from moe_unlearn.ops.routing_stats import RoutingStats, empty_routing_stats


@triton.jit
def _sortable_key(v):
    """fp32 -> int32 whose signed order is the float order (-inf lowest; NaN above +inf)."""
    b = v.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _sortable_key16(v):
    """fp16/bf16 -> int32 in [0, 65536) whose order is the float order (from the raw 16 bits)."""
    b = v.to(tl.int16, bitcast=True).to(tl.int32)
    return tl.where(b < 0, b ^ 0x7FFF, b) + 32768


@triton.jit
def _routing_stats_kernel(
    logits_ptr, stride_lt, stride_le,
    hidden_ptr, stride_ht, stride_hh,
    w_ptr, stride_we, stride_wh,
    bias_ptr, H,
    perm_ptr, seq_ptr, mask_ptr,
    idx_in_ptr, stride_it, stride_ik,
    idx_out_ptr,
    slot_gate_ptr, slot_tok_ptr, part_score_ptr, part_count_ptr,
    T, E, tiles_per_prog,
    K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    FUSED_GEMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_MASK: tl.constexpr,
    GIVEN_TOPK: tl.constexpr, RETURN_TOPK: tl.constexpr, SIGMOID: tl.constexpr, DOT_FP32: tl.constexpr,
    KEY32: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    score_acc = tl.zeros([E_PAD], dtype=tl.float32)
    count_acc = tl.zeros([E_PAD], dtype=tl.int32)
    prev_last = -1  # last sequence id of the previous tile: its slot continues, every other slot starts fresh
    for tile in range(0, tiles_per_prog):
        offs = (pid * tiles_per_prog + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_b = offs < T
        if HAS_PERM:
            rows = tl.load(perm_ptr + offs, mask=in_b, other=0).to(tl.int64)
        else:
            rows = offs.to(tl.int64)
        if FUSED_GEMM:
            acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
            hh = tl.arange(0, BLOCK_H)
            for h0 in range(0, H, BLOCK_H):
                h_ok = (h0 + hh) < H
                xh = tl.load(hidden_ptr + rows[:, None] * stride_ht + (h0 + hh)[None, :] * stride_hh,
                             mask=in_b[:, None] & h_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + cols[None, :] * stride_we + (h0 + hh)[:, None] * stride_wh,
                             mask=col_ok[None, :] & h_ok[:, None], other=0.0)
                if DOT_FP32:
                    acc = tl.dot(xh.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xh, wt.to(xh.dtype), acc)
            logits = acc
            if HAS_BIAS:
                logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            raw = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le,
                          mask=in_b[:, None] & col_ok[None, :], other=0.0)
            logits = raw.to(tl.float32)
        masked_logits = tl.where(col_ok[None, :], logits, float("-inf"))
        if SIGMOID:
            scores = tl.where(col_ok[None, :], 1.0 / (1.0 + tl.exp(-logits)), 0.0)
        else:
            row_max = tl.max(masked_logits, axis=1)
            ex = tl.exp(masked_logits - row_max[:, None])
            scores = ex / tl.sum(ex, axis=1)[:, None]

        if HAS_MASK:
            valid = in_b & (tl.load(mask_ptr + rows, mask=in_b, other=0) != 0)
        else:
            valid = in_b
        selected = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32) != 0
        if GIVEN_TOPK:
            for k in tl.static_range(K):
                ik = tl.load(idx_in_ptr + rows * stride_it + k * stride_ik, mask=in_b, other=-1)
                selected = selected | (cols[None, :] == ik[:, None])
        else:
            # Select on the logits: the same order as the scores (both maps are monotonic) without the ties
            # that rounding of exp can create. One max per pick over packed 64-bit keys (order-preserving
            # value bits high, E_PAD - 1 - index low): ties go to the lowest index, and a picked column
            # (key -1) or a padding column (key -2) never wins again, so the K indices are distinct even
            # when fewer than K logits are finite.
            if KEY32:
                # 16-bit logits: 32-bit keys are exact (16 order-preserving value bits, 8 index bits).
                vkey = _sortable_key16(raw).to(tl.int32)
                keys = tl.where(col_ok[None, :], (vkey << 8) | (E_PAD - 1 - cols)[None, :], -2)
            else:
                vkey = _sortable_key(masked_logits).to(tl.int64) + 2147483648  # >= 0
                keys = tl.where(col_ok[None, :], (vkey << 8) | (E_PAD - 1 - cols)[None, :], -2)
            for k in tl.static_range(K):
                best = tl.max(keys, axis=1)
                ik = (E_PAD - 1 - (best & 0xFF)).to(tl.int32)
                keys = tl.where(cols[None, :] == ik[:, None], -1, keys)  # 32-bit compare, one select
                if RETURN_TOPK:
                    tl.store(idx_out_ptr + rows * K + k, ik.to(tl.int64), mask=in_b)
            selected = keys == -1  # the picks, marked once after the loop

        keep = selected & valid[:, None]
        gates = tl.where(keep, scores, 0.0)
        score_acc += tl.sum(tl.where(valid[:, None], scores, 0.0), axis=0)
        count_acc += tl.sum(keep.to(tl.int32), axis=0)

        seqs = tl.load(seq_ptr + offs, mask=in_b, other=-1).to(tl.int32)
        s_first = tl.min(tl.where(in_b, seqs, 2147483647), axis=0)
        s_last = tl.max(seqs, axis=0)
        for s in range(s_first, s_last + 1):
            in_seq = seqs == s
            part = tl.sum(tl.where(in_seq[:, None], gates, 0.0), axis=0)
            ntok = tl.sum((in_seq & valid).to(tl.int32), axis=0)
            slot = pid + s
            gptr = slot_gate_ptr + slot.to(tl.int64) * E_PAD + cols
            tptr = slot_tok_ptr + slot
            if s == prev_last:
                part += tl.load(gptr)
                ntok += tl.load(tptr)
            tl.store(gptr, part)
            tl.store(tptr, ntok)
        prev_last = s_last
    tl.store(part_score_ptr + pid * E_PAD + cols, score_acc)
    tl.store(part_count_ptr + pid * E_PAD + cols, count_acc)


@triton.jit
def _lower_bound(seq_ptr, T, value, n_iter):
    """First position p in the sorted seq[0:T] with seq[p] >= value (T if none); n_iter >= log2(T + 1)."""
    lo = tl.zeros([1], dtype=tl.int64)
    hi = tl.zeros([1], dtype=tl.int64) + T
    for _ in range(0, n_iter):
        mid = (lo + hi) // 2
        go_right = (lo < hi) & (tl.load(seq_ptr + mid, mask=mid < T, other=0).to(tl.int64) < value)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right | (lo >= hi), hi, mid)
    return lo


@triton.jit
def _reduce_kernel(
    slot_gate_ptr, slot_tok_ptr, seq_ptr, part_score_ptr, part_count_ptr, gate_sum_ptr, tokens_ptr,
    score_sum_ptr, count_ptr, T, S, E, chunk, n_prog, n_iter,
    E_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Programs 0..S-1: one sequence each (its slots, in program order). Program S: score sums and selection
    counts over the per-program partials, in a fixed order. Deterministic; no atomics."""
    s = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    if s < S:
        t0 = _lower_bound(seq_ptr, T, s, n_iter)
        t1 = _lower_bound(seq_ptr, T, s + 1, n_iter)
        first = t0 // chunk
        n_progs = tl.where(t1 > t0, (tl.maximum(t1, 1) - 1) // chunk - first + 1, 0)
        acc = tl.zeros([E_PAD], dtype=tl.float32)
        ntok = tl.zeros([1], dtype=tl.int64)
        for i in range(0, tl.max(n_progs, axis=0)):
            slot = tl.max(first, axis=0) + i + s
            acc += tl.load(slot_gate_ptr + slot * E_PAD + cols)
            ntok += tl.load(slot_tok_ptr + slot + tl.arange(0, 1)).to(tl.int64)
        tl.store(gate_sum_ptr + s.to(tl.int64) * E + cols, acc, mask=cols < E)
        tl.store(tokens_ptr + s + tl.arange(0, 1), ntok)
    else:
        pp = tl.arange(0, BLOCK_P)
        sc = tl.zeros([BLOCK_P, E_PAD], dtype=tl.float32)
        cn = tl.zeros([BLOCK_P, E_PAD], dtype=tl.int64)
        for p0 in range(0, n_prog, BLOCK_P):
            m = ((p0 + pp) < n_prog)[:, None]
            off = (p0 + pp)[:, None] * E_PAD + cols[None, :]
            sc += tl.load(part_score_ptr + off, mask=m, other=0.0)
            cn += tl.load(part_count_ptr + off, mask=m, other=0).to(tl.int64)
        tl.store(score_sum_ptr + cols, tl.sum(sc, axis=0), mask=cols < E)
        tl.store(count_ptr + cols, tl.sum(cn, axis=0), mask=cols < E)


def _config(T: int, E_PAD: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, tiles per program). The interpreter wants few, big programs; the GPU wants enough
    programs to fill the SMs with a register tile of about 4K values."""
    if interpreting():  # (CPU tensors reach here only under the interpreter: check_launchable)
        block_t = max(16, min(256, 16384 // E_PAD))
        n_tiles = triton.cdiv(max(T, 1), block_t)
        return block_t, max(1, triton.cdiv(n_tiles, 4))
    block_t = max(16, min(128, 4096 // E_PAD))
    n_tiles = triton.cdiv(max(T, 1), block_t)
    return block_t, max(1, triton.cdiv(n_tiles, 8 * sm_count(device)))


def routing_stats_triton(
    logits: torch.Tensor | None,
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
    block_t: int | None = None,
    tiles_per_prog: int | None = None,
) -> RoutingStats:
    """Launcher with the contract of `routing_stats_torch` (inputs already validated by the caller).
    `seq_sorted`: True = seq_ids are non-decreasing (no check, no host sync), False = sort them, None =
    find out (one host sync). Two launches when sorted (pass + reduce): int64/int32 ids and bool masks are
    read as they are. `block_t` / `tiles_per_prog` override the heuristic (tests cover the partial logic)."""
    fused = logits is None
    src = hidden if fused else logits
    device = src.device
    T = src.shape[0]
    E = router_weight.shape[0] if fused else logits.shape[1]
    S = num_seqs
    E_PAD = max(16, triton.next_power_of_2(E))
    K = topk_idx.shape[1] if topk_idx is not None else top_k

    gate_sum = new_empty((S, E), torch.float32, device)
    tokens = new_empty((S,), torch.int64, device)
    idx_out = None
    if return_topk and topk_idx is None:
        idx_out = new_empty((T, K), torch.int64, device)
    if T == 0:
        return empty_routing_stats(gate_sum, tokens, E,
                                   idx_out if idx_out is not None else (topk_idx.long() if return_topk else None))

    check_launchable(src)
    if seq_sorted is None:
        # The one host sync left; callers that know their ids are sorted pass seq_sorted=True.
        seq_sorted = bool((seq_ids[1:] >= seq_ids[:-1]).all().item()) if T > 1 else True
    perm = None
    seq = seq_ids
    if not seq_sorted:
        seq, perm = torch.sort(seq_ids, stable=True)
    seq = seq.contiguous()

    bt, tiles = _config(T, E_PAD, device)
    bt = block_t or bt
    tiles = tiles_per_prog or tiles
    chunk = bt * tiles
    n_prog = triton.cdiv(T, chunk)
    # Every slot the reduction reads was written by the pass (a program writes the slot of each sequence it
    # meets), so the buffers start uninitialised.
    slot_gate = new_empty((n_prog + S, E_PAD), torch.float32, device)
    slot_tok = new_empty((n_prog + S,), torch.int32, device)
    part_score = new_empty((n_prog, E_PAD), torch.float32, device)
    part_count = new_empty((n_prog, E_PAD), torch.int32, device)
    score_sum = new_empty((E,), torch.float32, device)
    select_count = new_empty((E,), torch.int64, device)

    dummy = part_score  # stands in for absent pointers (never dereferenced: the flags are constexpr)
    if fused:
        dot_fp32 = dot_in_fp32(hidden.dtype, router_weight.dtype)
        block_h = 128 if interpreting() else 64
        lg, slt, sle = dummy, 0, 0
        hd, sht, shh = hidden, hidden.stride(0), hidden.stride(1)
        wt, swe, swh = router_weight, router_weight.stride(0), router_weight.stride(1)
        H = hidden.shape[1]
    else:
        dot_fp32, block_h, H = True, 16, 0
        lg, slt, sle = logits, logits.stride(0), logits.stride(1)
        hd, sht, shh, wt, swe, swh = dummy, 0, 0, dummy, 0, 0
    ti, sit, sik = (topk_idx, topk_idx.stride(0), topk_idx.stride(1)) if topk_idx is not None else (dummy, 0, 0)
    with device_guard(device):
        _routing_stats_kernel[(n_prog,)](
            lg, slt, sle, hd, sht, shh, wt, swe, swh,
            router_bias if router_bias is not None else dummy, H,
            perm if perm is not None else dummy, seq, mask if mask is not None else dummy,
            ti, sit, sik, idx_out if idx_out is not None else dummy,
            slot_gate, slot_tok, part_score, part_count,
            T, E, tiles,
            K=K, E_PAD=E_PAD, BLOCK_T=bt, BLOCK_H=block_h,
            FUSED_GEMM=fused, HAS_BIAS=router_bias is not None, HAS_PERM=perm is not None,
            HAS_MASK=mask is not None, GIVEN_TOPK=topk_idx is not None, RETURN_TOPK=idx_out is not None,
            SIGMOID=score_fn == "sigmoid", DOT_FP32=dot_fp32,
            KEY32=not fused and logits.dtype in (torch.float16, torch.bfloat16),
            num_warps=4, num_stages=1 if interpreting() else 3,
        )
        _reduce_kernel[(S + 1,)](
            slot_gate, slot_tok, seq, part_score, part_count, gate_sum, tokens, score_sum, select_count,
            T, S, E, chunk, n_prog, int(T).bit_length() + 1, E_PAD=E_PAD, BLOCK_P=32)
    out_idx = None
    if return_topk:
        out_idx = idx_out if idx_out is not None else topk_idx.long()
    return RoutingStats(gate_sum, select_count, score_sum, tokens, out_idx)
