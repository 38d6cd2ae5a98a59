"""Routed top-K loramoe_delta: token/expert pairs sorted by expert, so the FLOPs follow K, not E.

For many experts (E=64, top-4) densified gates cost E/K times the FLOPs and the gated intermediate no
longer fits on chip. Here the T*K (token, expert) pairs p = t*K + k are sorted by expert (a stable sort:
deterministic order) and cut into blocks of BLOCK_P pairs of one expert (each expert's run padded to a
whole number of blocks, with an upper bound on the number of blocks, so nothing syncs with the host).

Three kernels do all the work:
- `_gather_mm`: out[p] = s_p * in[row(p)] @ W_e for the pairs p of a block of expert e, where row(p) is the
  token t of the pair (reading x or dout) or the pair itself (reading a [T*K, .] intermediate), W_e a
  strided view of A_e or B_e, and s_p the pair's weight times scale (or scale alone). Every pair belongs to
  exactly one block, so every row of its output is written: no buffer is zero-filled first;
- `_sum_k`: out_t (+)= sum_k y_(t,k) over a [T, K, n] intermediate in the model dtype, accumulated in fp32,
  cast and added to the base in the same pass (one read of y, one write of out);
- `_group_wgrad`: G_e = sum over the pairs of expert e of L[row(p)]^T R[row(p)], in sorted order
  (fixed-order sum, no atomics), stored straight in the weight's dtype.

Forward:  h_p = x_t A_e^T [T*K, r] (fp32, small), y_p = scale w_p h_p B_e^T [T, K, d_out] (model dtype),
          out_t (+)= sum_k y_(t,k).
Backward: g_p = scale dout_t B_e, dw_p = <g_p, h_p>, dhg_p = w_p g_p, dx_p = dhg_p A_e [T, K, d_in] (model
          dtype), dx_t = sum_k dx_(t,k), dA_e = sum_p dhg_p^T x_t, dB_e = sum_p dout_t^T (scale w_p h_p).
Traffic per token (bytes of the model dtype es): forward (K d_in + 2 K d_out + d_out) es, backward
(K d_out + 2 K d_in + d_in) es for dx plus one more gathered pass over x and dout for dA and dB. When
this beats the dense formulation is decided by `moe_unlearn.ops.api.routed_pays`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from moe_unlearn.kernels._common import check_launchable, device_guard, dot_in_fp32, interpreting, new_empty
from moe_unlearn.kernels.loramoe_delta import _mm  # the one fp32-exact / tensor-core dot helper

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _gather_mm_kernel(
    in_ptr, s_in_r, s_in_k, w_ptr, s_we, s_wk, s_wn, pw_ptr, scale, out_ptr, s_out_r, s_out_n,
    order_ptr, block_expert_ptr, block_first_ptr, pair_start_ptr, count_ptr, E, KDIM, N, TOPK,
    IN_BY_TOKEN: tl.constexpr, HAS_PW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, CDT: tl.constexpr,
):
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b)
    if e < E:
        start = tl.load(pair_start_ptr + e)
        cnt = tl.load(count_ptr + e)
        i = (b - tl.load(block_first_ptr + e)) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = i < cnt
        p = tl.load(order_ptr + start + i, mask=ok, other=0)
        rows = p // TOPK if IN_BY_TOKEN else p
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        e64 = e.to(tl.int64)
        for k0 in range(0, KDIM, BLOCK_K):
            k_ok = (k0 + kk) < KDIM
            a = tl.load(in_ptr + rows[:, None] * s_in_r + (k0 + kk)[None, :] * s_in_k,
                        mask=ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + e64 * s_we + (k0 + kk)[:, None] * s_wk + n[None, :] * s_wn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mm(a, w, acc, CDT)
        if HAS_PW:
            acc = acc * (tl.load(pw_ptr + p, mask=ok, other=0.0).to(tl.float32) * scale)[:, None]
        else:
            acc = acc * scale
        tl.store(out_ptr + p[:, None] * s_out_r + n[None, :] * s_out_n, acc.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_k_kernel(
    y_ptr, out_ptr, s_ot, s_on, T, N,
    TOPK: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t, n] (+)= sum_k y[t * TOPK + k, n] for a contiguous y [T * TOPK, N]: fp32 sum, one cast."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (t < T)[:, None] & (n < N)[None, :]
    t64 = t.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(TOPK):
        acc += tl.load(y_ptr + (t64 * TOPK + k)[:, None] * N + n[None, :], mask=m, other=0.0).to(tl.float32)
    optr = out_ptr + t64[:, None] * s_ot + n[None, :] * s_on
    if ACCUMULATE:
        acc += tl.load(optr, mask=m, other=0.0).to(tl.float32)
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _group_wgrad_kernel(
    l_ptr, s_l_r, s_l_m, r_ptr, s_r_r, s_r_n, out_ptr, s_oe, s_om, s_on,
    order_ptr, pair_start_ptr, count_ptr, M, N, TOPK,
    L_BY_TOKEN: tl.constexpr, R_BY_TOKEN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CDT: tl.constexpr,
):
    e = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    start = tl.load(pair_start_ptr + e)
    cnt = tl.load(count_ptr + e)
    ii = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i0 in range(0, cnt, BLOCK_P):
        ok = (i0 + ii) < cnt
        p = tl.load(order_ptr + start + i0 + ii, mask=ok, other=0)
        lrow = p // TOPK if L_BY_TOKEN else p
        rrow = p // TOPK if R_BY_TOKEN else p
        lt = tl.load(l_ptr + lrow[None, :] * s_l_r + m[:, None] * s_l_m, mask=ok[None, :] & m_ok[:, None], other=0.0)
        rt = tl.load(r_ptr + rrow[:, None] * s_r_r + n[None, :] * s_r_n, mask=ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mm(lt, rt, acc, CDT)
    tl.store(out_ptr + e.to(tl.int64) * s_oe + m[:, None] * s_om + n[None, :] * s_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass
class PairBlocks:
    """Pairs sorted by expert and cut into blocks of one expert (all device tensors, no host sync)."""

    order: torch.Tensor  # [P] int64: pair ids p = t*K + k, sorted by expert (stable)
    block_expert: torch.Tensor  # [n_blocks] int64 expert of each block (E = unused block)
    block_first: torch.Tensor  # [E] int64 first block of each expert
    pair_start: torch.Tensor  # [E] int64 first sorted position of each expert
    count: torch.Tensor  # [E] int64 pairs per expert
    n_blocks: int  # upper bound: ceil(P / BLOCK_P) + E
    topk: int


def sort_pairs(topk_idx: torch.Tensor, E: int, block_p: int) -> PairBlocks:
    T, K = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    count = torch.bincount(flat, minlength=E)[:E]
    pair_start = torch.cumsum(count, 0) - count
    blocks = (count + block_p - 1) // block_p
    block_end = torch.cumsum(blocks, 0)
    n_blocks = triton.cdiv(T * K, block_p) + E
    block_expert = torch.searchsorted(block_end, torch.arange(n_blocks, device=flat.device), right=True)
    return PairBlocks(order, block_expert, block_end - blocks, pair_start, count, n_blocks, K)


def _cdt(*dtypes: torch.dtype):
    return tl.float32 if dot_in_fp32(*dtypes) else _TL_DTYPE[dtypes[0]]


def _blocks() -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_N)."""
    return (64, 64, 128) if interpreting() else (64, 64, 64)


def gather_mm(inp, in_by_token, w, w_strides, pw, scale, out, pb: PairBlocks, kdim: int, n: int, cdt):
    """out[p, :n] = (pw[p] *) scale * inp[row(p)] @ W_e, W_e[k, j] = w[e * s0 + k * s1 + j * s2]."""
    bp, bk, bn = _blocks()
    bn = max(16, min(bn, triton.next_power_of_2(n)))
    bk = max(16, min(bk, triton.next_power_of_2(kdim)))
    _gather_mm_kernel[(pb.n_blocks, triton.cdiv(n, bn))](
        inp, inp.stride(0), inp.stride(1), w, *w_strides, pw if pw is not None else out, float(scale),
        out, out.stride(0), out.stride(1), pb.order, pb.block_expert, pb.block_first, pb.pair_start, pb.count,
        pb.block_first.shape[0], kdim, n, pb.topk,
        IN_BY_TOKEN=in_by_token, HAS_PW=pw is not None, BLOCK_P=bp, BLOCK_K=bk, BLOCK_N=bn, CDT=cdt)


def group_wgrad(left, l_by_token, right, r_by_token, out, pb: PairBlocks, M: int, N: int, cdt):
    """out[e] = sum over pairs p of expert e of left[row(p), :M]^T right[row(p), :N]; out is [E, M, N] strided."""
    bp = 64 if not interpreting() else 128
    bm = max(16, min(64, triton.next_power_of_2(M)))
    bn = max(16, min(64 if not interpreting() else 128, triton.next_power_of_2(N)))
    E = out.shape[0]
    _group_wgrad_kernel[(E, triton.cdiv(M, bm), triton.cdiv(N, bn))](
        left, left.stride(0), left.stride(1), right, right.stride(0), right.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2), pb.order, pb.pair_start, pb.count, M, N, pb.topk,
        L_BY_TOKEN=l_by_token, R_BY_TOKEN=r_by_token, BLOCK_P=bp, BLOCK_M=bm, BLOCK_N=bn, CDT=cdt)


def sum_k(y: torch.Tensor, out: torch.Tensor, topk: int, accumulate: bool) -> torch.Tensor:
    """out (+)= y.view(T, topk, n).sum(1) in one pass (fp32 sum, cast to out's dtype); y contiguous."""
    T, n = out.shape
    if T and n:
        bt, bn = (32, 128) if interpreting() else (16, 256)
        _sum_k_kernel[(triton.cdiv(T, bt), triton.cdiv(n, bn))](
            y, out, out.stride(0), out.stride(1), T, n, TOPK=topk, ACCUMULATE=accumulate, BLOCK_T=bt, BLOCK_N=bn)
    return out


class RoutedDeltaFunction(torch.autograd.Function):
    """Inputs (x, A, B, topk_idx, topk_weight, base or None, scale); differentiable in x, A, B, topk_weight, base."""

    @staticmethod
    def forward(ctx, x, A, B, topk_idx, topk_weight, base, scale):
        check_launchable(x)
        T, d_in = x.shape
        E, r, _ = A.shape
        d_out = B.shape[1]
        K = topk_idx.shape[1]
        dev = x.device
        bp = _blocks()[0]
        w = topk_weight.reshape(-1)
        with device_guard(dev):
            pb = sort_pairs(topk_idx, E, bp)
            h = new_empty((T * K, r), torch.float32, dev)
            out = base if base is not None else new_empty((T, d_out), x.dtype, dev)
            if T > 0:
                # h_p = x_t A_e^T: W_e[k, j] = A[e, j, k]
                gather_mm(x, True, A, (A.stride(0), A.stride(2), A.stride(1)), None, 1.0, h, pb, d_in, r,
                          _cdt(x.dtype, A.dtype))
            if T > 0 and d_out > 0:
                # y_p = scale w_p h_p B_e^T: W_e[j, n] = B[e, n, j], in the model dtype, then one fused K-sum
                y = new_empty((T * K, d_out), x.dtype, dev)
                gather_mm(h, False, B, (B.stride(0), B.stride(2), B.stride(1)), w, scale, y, pb, r, d_out,
                          _cdt(B.dtype))
                sum_k(y, out, K, accumulate=base is not None)
            elif base is None:
                out.zero_()  # T == 0 or d_out == 0: an empty delta
        if base is not None:
            ctx.mark_dirty(base)
        ctx.save_for_backward(x, A, B, topk_idx, topk_weight, h)
        ctx.pb = pb
        ctx.scale = scale
        ctx.has_base = base is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, A, B, topk_idx, topk_weight, h = ctx.saved_tensors
        pb, scale = ctx.pb, ctx.scale
        T, d_in = x.shape
        E, r, _ = A.shape
        d_out = B.shape[1]
        K = topk_idx.shape[1]
        dev = x.device
        need_x, need_a, need_b, _, need_w, need_base, _ = ctx.needs_input_grad
        dx = dA = dB = dw = None
        w = topk_weight.reshape(-1).float()
        with device_guard(dev):
            if T > 0 and d_out > 0:
                # g_p = scale dout_t B_e: W_e[n, j] = B[e, n, j] (every pair's row written: no zero-fill)
                g = new_empty((T * K, r), torch.float32, dev)
                gather_mm(dout, True, B, (B.stride(0), B.stride(1), B.stride(2)), None, scale, g, pb, d_out, r,
                          _cdt(dout.dtype, B.dtype))
            else:
                g = torch.zeros((T * K, r), dtype=torch.float32, device=dev)
            if need_w:
                dw = (g * h).sum(-1).view(T, K).to(topk_weight.dtype)
            dhg = g * w[:, None]
            if need_x:
                dx = new_empty((T, d_in), x.dtype, dev)
                if T > 0:
                    # dx_p = dhg_p A_e: W_e[j, k] = A[e, j, k], in the model dtype, then one fused K-sum
                    dxp = new_empty((T * K, d_in), x.dtype, dev)
                    gather_mm(dhg, False, A, (A.stride(0), A.stride(1), A.stride(2)), None, 1.0, dxp, pb, r, d_in,
                              _cdt(A.dtype))
                    sum_k(dxp, dx, K, accumulate=False)
            if need_a:
                # every (expert, row, column) is written, experts without pairs as 0: no zero-fill
                dA = new_empty((E, r, d_in), A.dtype, dev)
                if T > 0:
                    group_wgrad(dhg, False, x, True, dA, pb, r, d_in, _cdt(x.dtype))
                else:
                    dA.zero_()
            if need_b:
                dB = new_empty((E, d_out, r), B.dtype, dev)
                if T > 0 and d_out > 0:
                    hg = h * (w * scale)[:, None]
                    group_wgrad(dout, True, hg, False, dB, pb, d_out, r, _cdt(dout.dtype))
                else:
                    dB.zero_()
        dbase = dout if ctx.has_base and need_base else None
        return dx, dA, dB, None, dw, dbase, None


def loramoe_delta_routed_triton(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, *,
    scale: float = 1.0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-K entry whose cost follows K (inputs validated by the caller; topk_idx values in [0, E))."""
    return RoutedDeltaFunction.apply(x, A, B, topk_idx.long(), topk_weight, out, float(scale))
