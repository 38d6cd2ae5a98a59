"""Triton loramoe_delta: out (+)= scale * sum_e g[:, e] * (x A_e^T) B_e^T, forward and backward.

The mixture is two GEMMs over the stacked experts, using
    sum_e g_e B_e A_e x = B_cat ((g (x) 1_r) * (A_stack x)),   A_stack [E*r, d_in], B_cat [d_out, E*r]:
h = x A_stack^T [T, E*r] (accumulated in fp32, kept in the model dtype when it is bf16/fp16), then out = scale * (h * G) B_cat^T with the gate G[t, e] applied per
column while the tile is on chip.

Columns of h are walked in *column blocks* of EB experts x RC rank columns (RC = the rank padded to a
power of two, capped at RC_MAX; a larger rank is split into NRC chunks of RC and then EB = 1). Padded
columns are masked to zero, which also keeps every tl.dot dimension >= 16 for small ranks (r = 4, 8), and
the cap keeps the shared memory of a tile below sm_90's 227 KB for any rank (r = 256 needs two chunks).

Forward: when all columns fit one block (E * RC <= 256: the LoRAMoE shapes, E=8 r=16 -> 128 columns) one
persistent kernel per token tile streams x once, keeps the gated h on chip and loops over d_out, so x is
read once and the delta written once (h is written only when a backward will need it). Otherwise a
shrink kernel writes h and an expand kernel applies the gates in its prologue.

Backward (dout = dL/dout):
    dhg = scale * dout B_cat            [T, E*r]  (kernel _bwd_h, which also gives)
    dgates[t, e] = sum_j dhg * h        [T, E]    (per rank chunk; chunks summed in a fixed order)
    dh = dhg * G                        [T, E*r]
    dx = dh A_stack                     [T, d_in]      (_bwd_dx)
    dA_stack = dh^T x                   [E*r, d_in]    (_bwd_dA, split over T, fixed-order sum)
    dB_cat = scale * dout^T (h * G)     [d_out, E*r]   (_bwd_dB, split over T, fixed-order sum)
The split partials (and the rank-chunk partials of dgates) are summed and cast by one kernel (_sum_splits).
When all columns fit one block, dx and dA come from one kernel (_bwd_dx_dA) that reads x and dh once.
"""

from __future__ import annotations

from dataclasses import dataclass

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

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
FUSED_MAX_COLS = 256  # widest column block the fused forward keeps on chip


@triton.jit
def _expert_cols(blk, E, r, EB: tl.constexpr, RC: tl.constexpr, NRC: tl.constexpr):
    """Column block `blk`: expert id, rank index, valid mask and compact column (e * r + j) of each column."""
    c = tl.arange(0, EB * RC)
    e = (blk // NRC) * EB + c // RC
    j = (blk % NRC) * RC + c % RC
    ok = (e < E) & (j < r)
    return e, j, ok, e * r + j


@triton.jit
def _mm(a, b, acc, CDT: tl.constexpr):
    """acc += a @ b in the compute dtype: exact fp32 (never tf32) or fp16/bf16 tensor cores."""
    if CDT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(CDT), b.to(CDT), acc)


@triton.jit
def _shrink_tile(x_ptr, sxt, sxd, a_ptr, sae, sar, sad, t64, t_ok, e, j, c_ok, D_IN,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, CW: tl.constexpr, CDT: tl.constexpr):
    """h tile [BLOCK_T, CW] = x[t] A_stack[cols]^T, accumulated in fp32."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, CW], dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        k_ok = (k0 + kk) < D_IN
        xt = tl.load(x_ptr + t64[:, None] * sxt + (k0 + kk)[None, :] * sxd,
                     mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + e[None, :] * sae + j[None, :] * sar + (k0 + kk)[:, None] * sad,
                     mask=c_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _mm(xt, at, acc, CDT)
    return acc


@triton.jit
def _fwd_fused_kernel(
    x_ptr, sxt, sxd, a_ptr, sae, sar, sad, g_ptr, sgt, sge, b_ptr, sbe, sbn, sbr, out_ptr, sot, son, h_ptr,
    T, D_IN, D_OUT, E, r, scale,
    EB: tl.constexpr, RC: tl.constexpr, CDT: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE_H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Persistent: each program walks token tiles pid, pid + P, ...; the gated h stays in registers."""
    e, j, c_ok, col = _expert_cols(0, E, r, EB, RC, 1)
    nn = tl.arange(0, BLOCK_N)
    n_tiles = tl.cdiv(T, BLOCK_T)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        t64 = t.to(tl.int64)
        h = _shrink_tile(x_ptr, sxt, sxd, a_ptr, sae, sar, sad, t64, t_ok, e, j, c_ok, D_IN,
                         BLOCK_T, BLOCK_K, EB * RC, CDT)
        hm = t_ok[:, None] & c_ok[None, :]
        if SAVE_H:
            tl.store(h_ptr + t64[:, None] * (E * r) + col[None, :], h.to(h_ptr.dtype.element_ty), mask=hm)
        g = tl.load(g_ptr + t64[:, None] * sgt + e[None, :] * sge, mask=hm, other=0.0).to(tl.float32)
        hg = (h * g * scale).to(CDT)
        for n0 in range(0, D_OUT, BLOCK_N):
            n = n0 + nn
            n_ok = n < D_OUT
            bt = tl.load(b_ptr + e[:, None] * sbe + n[None, :] * sbn + j[:, None] * sbr,
                         mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mm(hg, bt, tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32), CDT)
            optr = out_ptr + t64[:, None] * sot + n[None, :] * son
            om = t_ok[:, None] & n_ok[None, :]
            if ACCUMULATE:
                acc += tl.load(optr, mask=om, other=0.0).to(tl.float32)
            tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def _fwd_h_kernel(
    x_ptr, sxt, sxd, a_ptr, sae, sar, sad, h_ptr, T, D_IN, E, r,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, EB: tl.constexpr, RC: tl.constexpr, NRC: tl.constexpr,
    CDT: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    e, j, c_ok, col = _expert_cols(tl.program_id(1), E, r, EB, RC, NRC)
    acc = _shrink_tile(x_ptr, sxt, sxd, a_ptr, sae, sar, sad, t64, t_ok, e, j, c_ok, D_IN,
                       BLOCK_T, BLOCK_K, EB * RC, CDT)
    tl.store(h_ptr + t64[:, None] * (E * r) + col[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _load_hg(h_ptr, g_ptr, sgt, sge, t64, t_ok, e, c_ok, col, E, r):
    """(h, gate) for a [BLOCK_T, EB*RC] tile, fp32; zero in padded rows/columns."""
    m = t_ok[:, None] & c_ok[None, :]
    h = tl.load(h_ptr + t64[:, None] * (E * r) + col[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + t64[:, None] * sgt + e[None, :] * sge, mask=m, other=0.0).to(tl.float32)
    return h, g


@triton.jit
def _fwd_out_kernel(
    h_ptr, g_ptr, sgt, sge, b_ptr, sbe, sbn, sbr, out_ptr, sot, son, T, D_OUT, E, r, scale, NB,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, EB: tl.constexpr, RC: tl.constexpr, NRC: tl.constexpr,
    CDT: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D_OUT
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for blk in range(0, NB):
        e, j, c_ok, col = _expert_cols(blk, E, r, EB, RC, NRC)
        h, g = _load_hg(h_ptr, g_ptr, sgt, sge, t64, t_ok, e, c_ok, col, E, r)
        bt = tl.load(b_ptr + e[:, None] * sbe + n[None, :] * sbn + j[:, None] * sbr,
                     mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mm(h * g, bt, acc, CDT)
    acc = acc * scale
    optr = out_ptr + t64[:, None] * sot + n[None, :] * son
    om = t_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(optr, mask=om, other=0.0).to(tl.float32)
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def _bwd_h_kernel(
    do_ptr, sdt, sdn, b_ptr, sbe, sbn, sbr, h_ptr, g_ptr, sgt, sge, dh_ptr, dg_ptr, T, D_OUT, E, r, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, EB: tl.constexpr, RC: tl.constexpr, NRC: tl.constexpr,
    CDT: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    blk = tl.program_id(1)
    e, j, c_ok, col = _expert_cols(blk, E, r, EB, RC, NRC)
    nn = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_T, EB * RC], dtype=tl.float32)
    for n0 in range(0, D_OUT, BLOCK_N):
        n_ok = (n0 + nn) < D_OUT
        go = tl.load(do_ptr + t64[:, None] * sdt + (n0 + nn)[None, :] * sdn,
                     mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + e[None, :] * sbe + (n0 + nn)[:, None] * sbn + j[None, :] * sbr,
                     mask=c_ok[None, :] & n_ok[:, None], other=0.0)
        acc = _mm(go, bt, acc, CDT)
    dhg = acc * scale
    h, g = _load_hg(h_ptr, g_ptr, sgt, sge, t64, t_ok, e, c_ok, col, E, r)
    # dh first: g is dead before the dgates reduction (fewer live registers).
    tl.store(dh_ptr + t64[:, None] * (E * r) + col[None, :], (dhg * g).to(dh_ptr.dtype.element_ty),
             mask=t_ok[:, None] & c_ok[None, :])
    dg = tl.sum(tl.reshape(dhg * h, (BLOCK_T, EB, RC)), axis=2)
    eg = (blk // NRC) * EB + tl.arange(0, EB)
    # dg partial of rank chunk (blk % NRC): [NRC, T, E], summed over chunks in a fixed order afterwards.
    dg_base = dg_ptr + (blk % NRC).to(tl.int64) * T * E
    tl.store(dg_base + t64[:, None] * E + eg[None, :], dg, mask=t_ok[:, None] & (eg < E)[None, :])


@triton.jit
def _bwd_dx_kernel(
    dh_ptr, a_ptr, sae, sar, sad, dx_ptr, sxt, sxd, T, D_IN, E, r, NB,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EB: tl.constexpr, RC: tl.constexpr, NRC: tl.constexpr,
    CDT: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D_IN
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for blk in range(0, NB):
        e, j, c_ok, col = _expert_cols(blk, E, r, EB, RC, NRC)
        dh = tl.load(dh_ptr + t64[:, None] * (E * r) + col[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        at = tl.load(a_ptr + e[:, None] * sae + j[:, None] * sar + d[None, :] * sad,
                     mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mm(dh, at, acc, CDT)
    tl.store(dx_ptr + t64[:, None] * sxt + d[None, :] * sxd, acc.to(dx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dx_dA_kernel(
    dh_ptr, a_ptr, sae, sar, sad, x_ptr, sxt, sxd, dx_ptr, sdxt, sdxd, part_ptr, T, D_IN, E, r, t_chunk,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EB: tl.constexpr, RC: tl.constexpr, CDT: tl.constexpr,
    CDT_X: tl.constexpr, NEED_DX: tl.constexpr,
):
    """All columns in one block: per (d_in tile, T split), one pass over x and dh gives the dx tile of every
    token in the split and the dA partial of the split (dx = dh A_stack; dA = dh^T x)."""
    e, j, c_ok, col = _expert_cols(0, E, r, EB, RC, 1)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D_IN
    split = tl.program_id(1)
    t_start = split * t_chunk
    t_end = tl.minimum(t_start + t_chunk, T)
    tt = tl.arange(0, BLOCK_T)
    at = tl.load(a_ptr + e[:, None] * sae + j[:, None] * sar + d[None, :] * sad,
                 mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    acc_a = tl.zeros([EB * RC, BLOCK_D], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tt
        t_ok = t < t_end
        t64 = t.to(tl.int64)
        dh = tl.load(dh_ptr + t64[:, None] * (E * r) + col[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        if NEED_DX:
            dx = _mm(dh, at, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), CDT)
            tl.store(dx_ptr + t64[:, None] * sdxt + d[None, :] * sdxd, dx.to(dx_ptr.dtype.element_ty),
                     mask=t_ok[:, None] & d_ok[None, :])
        xt = tl.load(x_ptr + t64[:, None] * sxt + d[None, :] * sxd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        acc_a = _mm(tl.trans(dh), xt, acc_a, CDT_X)
    base = split.to(tl.int64) * (E * r) * D_IN
    tl.store(part_ptr + base + col[:, None] * D_IN + d[None, :], acc_a, mask=c_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dA_kernel(
    dh_ptr, x_ptr, sxt, sxd, part_ptr, T, D_IN, E, r, t_chunk,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EB: tl.constexpr, RC: tl.constexpr, NRC: tl.constexpr,
    CDT: tl.constexpr,
):
    e, j, c_ok, col = _expert_cols(tl.program_id(0), E, r, EB, RC, NRC)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D_IN
    split = tl.program_id(2)
    t_start = split * t_chunk
    t_end = tl.minimum(t_start + t_chunk, T)
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros([EB * RC, BLOCK_D], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tt
        t_ok = t < t_end
        t64 = t.to(tl.int64)
        dh_t = tl.load(dh_ptr + t64[None, :] * (E * r) + col[:, None], mask=c_ok[:, None] & t_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + t64[:, None] * sxt + d[None, :] * sxd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mm(dh_t, xt, acc, CDT)
    base = split.to(tl.int64) * (E * r) * D_IN
    tl.store(part_ptr + base + col[:, None] * D_IN + d[None, :], acc, mask=c_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dB_kernel(
    do_ptr, sdt, sdn, h_ptr, g_ptr, sgt, sge, part_ptr, T, D_OUT, E, r, scale, t_chunk,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, EB: tl.constexpr, RC: tl.constexpr, NRC: tl.constexpr,
    CDT: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D_OUT
    e, j, c_ok, col = _expert_cols(tl.program_id(1), E, r, EB, RC, NRC)
    split = tl.program_id(2)
    t_start = split * t_chunk
    t_end = tl.minimum(t_start + t_chunk, T)
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_N, EB * RC], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tt
        t_ok = t < t_end
        t64 = t.to(tl.int64)
        go_t = tl.load(do_ptr + t64[None, :] * sdt + n[:, None] * sdn, mask=n_ok[:, None] & t_ok[None, :], other=0.0)
        h, g = _load_hg(h_ptr, g_ptr, sgt, sge, t64, t_ok, e, c_ok, col, E, r)
        acc = _mm(go_t, h * g, acc, CDT)
    base = split.to(tl.int64) * E * D_OUT * r
    ptr = part_ptr + base + e[None, :].to(tl.int64) * (D_OUT * r) + n[:, None] * r + j[None, :]
    tl.store(ptr, acc * scale, mask=n_ok[:, None] & c_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, N, SPLITS, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i] in a fixed order (fp32), cast to out's dtype: one pass, no atomics."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptrs = part_ptr + i
    for _ in range(0, SPLITS):
        acc += tl.load(ptrs, mask=m, other=0.0)
        ptrs += N  # one split further (pointer steps: no 32-bit product)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=m)


def sum_splits(part: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """part [splits, ...] fp32 (contiguous) -> its sum over splits as a new `shape` tensor in `dtype`, in one
    launch (instead of a torch sum and a cast with an fp32 intermediate)."""
    out = new_empty(shape, dtype, part.device)
    n = out.numel()
    if n:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(n, block),)](part, out, n, part.shape[0], BLOCK=block)
    return out


def _fused_configs() -> list:
    """Autotuning space of the fused forward on the GPU (never used under the interpreter, where
    @triton.autotune with more than one config fails). Compiled for sm_90 with Triton 3.9 (no GPU, see
    benchmarks/compile_sm90.py) at E=8, r=16, bf16, every config uses 255 registers and spills some: 192 B for
    the first two, 316 B and 600 B for the others; BLOCK_N = 128 spilled 1-1.8 KB and was dropped."""
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bt, bk, bn, w, s in [(128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (64, 64, 64, 4, 4),
                                     (128, 128, 64, 8, 3)]]


_fwd_fused_tuned = None


def _fwd_fused_autotuned():
    global _fwd_fused_tuned
    if _fwd_fused_tuned is None:
        _fwd_fused_tuned = triton.autotune(_fused_configs(), key=["D_IN", "D_OUT", "E", "r"],
                                           restore_value=["out_ptr"])(_fwd_fused_kernel)
    return _fwd_fused_tuned


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape. A column block is EB experts x RC rank columns (EB * RC >= 16 so tl.dot is legal on the
    GPU); a rank above RC is split into NRC = ceil(r_pad / RC) chunks (then EB = 1)."""

    block_t: int
    block_k: int  # tile of d_in / d_out in the GEMM loops and output tiles
    experts_per_block: int
    rank_chunk: int
    rank_chunks: int
    split_t: int  # programs per column tile in the T-reductions of dA / dB (fixed-order sum after)
    fused: bool  # one column block: fused forward and the one-pass dx + dA backward
    num_warps: int = 4
    num_stages: int = 2

    @property
    def cols(self) -> int:
        return self.experts_per_block * self.rank_chunk

    def blocks(self, E: int) -> int:
        return triton.cdiv(E, self.experts_per_block) * self.rank_chunks


def make_config(E: int, r: int, *, block_t: int, block_k: int, split_t: int, rank_chunk_max: int = 128,
                cols_max: int = 128, allow_fused: bool = True, num_warps: int = 4, num_stages: int = 2) -> KernelConfig:
    rp = triton.next_power_of_2(r)
    rc = min(rp, rank_chunk_max)
    nrc = rp // rc
    eb = 1 if nrc > 1 else min(triton.next_power_of_2(E), max(1, cols_max // rc))
    eb = max(eb, max(1, 16 // rc))
    fused = allow_fused and nrc == 1 and triton.cdiv(E, eb) == 1
    return KernelConfig(block_t, block_k, eb, rc, nrc, split_t, fused, num_warps, num_stages)


def pick_config(T: int, d_in: int, d_out: int, E: int, r: int, device: torch.device) -> KernelConfig:
    """Heuristic for the unfused kernels (the fused forward is autotuned on the GPU)."""
    interp = interpreting()  # (CPU tensors reach here only under the interpreter: check_launchable)
    block_t = 128 if interp else 64
    block_k = 128 if interp else 64
    rp = triton.next_power_of_2(r)
    # All columns on chip when they fit FUSED_MAX_COLS; else 128-column blocks (shared memory of sm_90).
    cols_max = FUSED_MAX_COLS if triton.next_power_of_2(E) * min(rp, 128) <= FUSED_MAX_COLS else 128
    n_t = triton.cdiv(max(T, 1), block_t)
    cfg = make_config(E, r, block_t=block_t, block_k=block_k, split_t=1, cols_max=cols_max,
                      num_warps=4 if interp else 8 if cols_max > 128 else 4, num_stages=2 if interp else 3)
    if interp:
        split = min(2, n_t)
    else:
        progs = cfg.blocks(E) * triton.cdiv(max(d_in, d_out), block_k)
        split = max(1, min(n_t, triton.cdiv(2 * sm_count(device), progs)))
    return KernelConfig(**{**cfg.__dict__, "split_t": split})


def inter_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """dtype of the [T, E*r] intermediates h and dh: the model dtype when every operand is one 16-bit dtype
    (the tensor-core GEMMs round them to it anyway; half the bytes of fp32), else fp32. bf16 stays fp32 under
    the interpreter, which converts to bf16 by truncation (twice the rounding error of the GPU's
    round-to-nearest); fp16 runs the 16-bit path there."""
    first = tensors[0].dtype
    same = all(t.dtype == first for t in tensors)
    if not same or first == torch.float32 or (first == torch.bfloat16 and interpreting()):
        return torch.float32
    return first


def _cdt(*tensors: torch.Tensor):
    dtypes = [t.dtype for t in tensors]
    return tl.float32 if dot_in_fp32(*dtypes) else _TL_DTYPE[dtypes[0]]


def loramoe_delta_forward(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scale: float,
    base: torch.Tensor | None = None, config: KernelConfig | None = None, save_h: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (out, h). out is `base` updated in place when given, else a new [T, d_out] tensor in x's dtype;
    h [T, E*r] (inter_dtype: bf16/fp16 for a 16-bit model, else fp32) is kept for the backward (None when
    save_h is False and the fused kernel ran)."""
    check_launchable(x)
    T, d_in = x.shape
    E, r, _ = A.shape
    d_out = B.shape[1]
    cfg = config or pick_config(T, d_in, d_out, E, r, x.device)
    out = base if base is not None else new_empty((T, d_out), x.dtype, x.device)
    if T == 0 or d_out == 0:
        # Nothing to write; h only feeds dgates = <scale dout B, h>, which is 0 for an empty dout.
        return out, torch.zeros((T, E * r), dtype=inter_dtype(x, A, B), device=x.device)
    cdt = _cdt(x, A, B)
    with device_guard(x.device):
        if cfg.fused:
            h = new_empty((T, E * r), inter_dtype(x, A, B), x.device) if save_h else None
            args = (x, x.stride(0), x.stride(1), A, A.stride(0), A.stride(1), A.stride(2),
                    gates, gates.stride(0), gates.stride(1), B, B.stride(0), B.stride(1), B.stride(2),
                    out, out.stride(0), out.stride(1), h if h is not None else out, T, d_in, d_out, E, r, float(scale))
            flags = dict(EB=cfg.experts_per_block, RC=cfg.rank_chunk, CDT=cdt, ACCUMULATE=base is not None,
                         SAVE_H=save_h)
            if config is not None or interpreting():
                n_prog = min(triton.cdiv(T, cfg.block_t), 4 * sm_count(x.device))
                _fwd_fused_kernel[(n_prog,)](*args, **flags, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k,
                                             BLOCK_N=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            else:
                sms = sm_count(x.device)
                _fwd_fused_autotuned()[lambda meta: (min(triton.cdiv(T, meta["BLOCK_T"]), 2 * sms),)](*args, **flags)
            return out, h
        h = new_empty((T, E * r), inter_dtype(x, A, B), x.device)
        nb = cfg.blocks(E)
        blocks = dict(EB=cfg.experts_per_block, RC=cfg.rank_chunk, NRC=cfg.rank_chunks, CDT=cdt,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _fwd_h_kernel[(triton.cdiv(T, cfg.block_t), nb)](
            x, x.stride(0), x.stride(1), A, A.stride(0), A.stride(1), A.stride(2), h, T, d_in, E, r,
            BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, **blocks)
        _fwd_out_kernel[(triton.cdiv(T, cfg.block_t), triton.cdiv(d_out, cfg.block_k))](
            h, gates, gates.stride(0), gates.stride(1), B, B.stride(0), B.stride(1), B.stride(2),
            out, out.stride(0), out.stride(1), T, d_out, E, r, float(scale), nb,
            BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_k, ACCUMULATE=base is not None, **blocks)
    return out, h


def loramoe_delta_backward(
    dout: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor,
    h: torch.Tensor, scale: float, needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB, dgates); an entry is None where `needs` (x, A, B, gates) says it is not wanted."""
    check_launchable(x)
    T, d_in = x.shape
    E, r, _ = A.shape
    d_out = B.shape[1]
    dev = x.device
    cfg = config or pick_config(T, d_in, d_out, E, r, dev)
    bt, bk = cfg.block_t, cfg.block_k
    nb = cfg.blocks(E)
    blocks = dict(EB=cfg.experts_per_block, RC=cfg.rank_chunk, NRC=cfg.rank_chunks,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    split = max(1, min(cfg.split_t, triton.cdiv(max(T, 1), bt)))
    t_chunk = triton.cdiv(triton.cdiv(max(T, 1), split), bt) * bt
    split = triton.cdiv(max(T, 1), t_chunk)
    need_x, need_a, need_b, need_g = needs
    cdt_out = _cdt(dout, B)
    dx = dA = dB = dg = None
    with device_guard(dev):
        if need_x or need_a or need_g:
            dh = new_empty((T, E * r), inter_dtype(x, A, B, dout), dev)
            dg_part = new_empty((cfg.rank_chunks, T, E), torch.float32, dev)
            if T > 0:
                _bwd_h_kernel[(triton.cdiv(T, bt), nb)](
                    dout, dout.stride(0), dout.stride(1), B, B.stride(0), B.stride(1), B.stride(2),
                    h, gates, gates.stride(0), gates.stride(1), dh, dg_part, T, d_out, E, r, float(scale),
                    BLOCK_T=bt, BLOCK_N=bk, CDT=cdt_out, **blocks)
            if need_g:
                dg = sum_splits(dg_part, (T, E), gates.dtype)
            if need_x:
                dx = new_empty((T, d_in), x.dtype, dev)
            if cfg.fused and need_a and T > 0:
                part = new_empty((split, E * r, d_in), torch.float32, dev)
                _bwd_dx_dA_kernel[(triton.cdiv(d_in, bk), split)](
                    dh, A, A.stride(0), A.stride(1), A.stride(2), x, x.stride(0), x.stride(1),
                    dx if dx is not None else x, *(dx.stride() if dx is not None else (0, 0)), part, T, d_in, E, r,
                    t_chunk, BLOCK_T=bt, BLOCK_D=bk, EB=cfg.experts_per_block, RC=cfg.rank_chunk, CDT=_cdt(A),
                    CDT_X=_cdt(x), NEED_DX=need_x, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                dA = sum_splits(part, (E, r, d_in), A.dtype)
            else:
                if need_x and T > 0:
                    _bwd_dx_kernel[(triton.cdiv(T, bt), triton.cdiv(d_in, bk))](
                        dh, A, A.stride(0), A.stride(1), A.stride(2), dx, dx.stride(0), dx.stride(1),
                        T, d_in, E, r, nb, BLOCK_T=bt, BLOCK_D=bk, CDT=_cdt(A), **blocks)
                if need_a:
                    if T == 0:
                        dA = torch.zeros_like(A)
                    else:
                        part = new_empty((split, E * r, d_in), torch.float32, dev)
                        _bwd_dA_kernel[(nb, triton.cdiv(d_in, bk), split)](
                            dh, x, x.stride(0), x.stride(1), part, T, d_in, E, r, t_chunk,
                            BLOCK_T=bt, BLOCK_D=bk, CDT=_cdt(x), **blocks)
                        dA = sum_splits(part, (E, r, d_in), A.dtype)
        if need_b:
            if T == 0:
                dB = torch.zeros_like(B)
            else:
                part = new_empty((split, E, d_out, r), torch.float32, dev)
                _bwd_dB_kernel[(triton.cdiv(d_out, bk), nb, split)](
                    dout, dout.stride(0), dout.stride(1), h, gates, gates.stride(0), gates.stride(1), part,
                    T, d_out, E, r, float(scale), t_chunk, BLOCK_T=bt, BLOCK_N=bk, CDT=_cdt(dout), **blocks)
                dB = sum_splits(part, (E, d_out, r), B.dtype)
    return dx, dA, dB, dg


class LoRAMoEDeltaFunction(torch.autograd.Function):
    """Autograd wrapper: inputs (x, A, B, dense gates [T, E], base or None, scale)."""

    @staticmethod
    def forward(ctx, x, A, B, gates, base, scale):
        needs = any(ctx.needs_input_grad[:4])
        out, h = loramoe_delta_forward(x, A, B, gates, scale, base, save_h=needs)
        if needs:
            ctx.save_for_backward(x, A, B, gates, h)
        ctx.scale = scale
        ctx.has_base = base is not None
        if base is not None:
            ctx.mark_dirty(base)
        return out

    @staticmethod
    def backward(ctx, dout):
        grads: tuple = (None, None, None, None)
        if any(ctx.needs_input_grad[:4]):
            x, A, B, gates, h = ctx.saved_tensors
            grads = loramoe_delta_backward(dout, x, A, B, gates, h, ctx.scale, tuple(ctx.needs_input_grad[:4]))
        dbase = dout if ctx.has_base and ctx.needs_input_grad[4] else None
        return (*grads, dbase, None)


def loramoe_delta_triton(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, *, scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense-gate entry (top-K is turned into dense gates by the caller, so weight grads flow through torch)."""
    return LoRAMoEDeltaFunction.apply(x, A, B, gates, out, float(scale))
