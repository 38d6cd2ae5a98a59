"""Triton loramoe_delta: out (+)= scale * sum_e g[:, e] * (x A_e^T) B_e^T, forward and backward.

The mixture is computed as two GEMMs over the stacked experts (SPEC section 4): h = x A_stack^T
[T, E*r] in fp32, then out = scale * (h * G) B_cat^T with the gate G[t, e] applied per column while
the tile is in registers. Experts are walked in blocks of EB inside the kernels (no Python loop over
experts). A column block is laid out as EB experts x RP (the rank padded to a power of two); padded
columns are masked to zero, which also makes every tl.dot dimension >= 16 for small ranks (r = 4, 8).

Backward (dout = dL/dout):
    dhg = scale * dout B_cat            [T, E*r]  (kernel _bwd_h, which also gives)
    dgates[t, e] = sum_j dhg * h        [T, E]
    dh = dhg * G                        [T, E*r]
    dx = dh A_stack                     [T, d_in]      (_bwd_dx)
    dA_stack = dh^T x                   [E*r, d_in]    (_bwd_dA, split over T, fixed-order sum)
    dB_cat = scale * dout^T (h * G)     [d_out, E*r]   (_bwd_dB, split over T, fixed-order sum)
h is saved from the forward (fp32, T * E * r values: small next to x) instead of recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from moe_unlearn.kernels._common import dot_in_fp32, interpreting, new_empty, sm_count

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _expert_cols(e0, E, r, EB: tl.constexpr, RP: tl.constexpr):
    """Columns of a block of EB experts starting at e0: expert id, rank index, valid mask, compact column."""
    c = tl.arange(0, EB * RP)
    e = e0 + c // RP
    j = c % RP
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
def _fwd_h_kernel(
    x_ptr, sxt, sxd, a_ptr, sae, sar, sad, h_ptr, T, D_IN, E, r,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, CDT: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    e, j, c_ok, col = _expert_cols(tl.program_id(1) * EB, E, r, EB, RP)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, EB * RP], dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        k_ok = (k0 + kk) < D_IN
        xt = tl.load(x_ptr + t64[:, None] * sxt + (k0 + kk)[None, :] * sxd,
                     mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + e[None, :] * sae + j[None, :] * sar + (k0 + kk)[:, None] * sad,
                     mask=c_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _mm(xt, at, acc, CDT)
    tl.store(h_ptr + t64[:, None] * (E * r) + col[None, :], acc, mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _load_hg(h_ptr, g_ptr, sgt, sge, t64, t_ok, e, c_ok, col, E, r):
    """(h * gate) for a [BLOCK_T, EB*RP] tile, fp32; zero in padded rows/columns."""
    m = t_ok[:, None] & c_ok[None, :]
    h = tl.load(h_ptr + t64[:, None] * (E * r) + col[None, :], mask=m, other=0.0)
    g = tl.load(g_ptr + t64[:, None] * sgt + e[None, :] * sge, mask=m, other=0.0).to(tl.float32)
    return h, g


@triton.jit
def _fwd_out_kernel(
    h_ptr, g_ptr, sgt, sge, b_ptr, sbe, sbn, sbr, out_ptr, sot, son, T, D_OUT, E, r, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, CDT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D_OUT
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for e0 in range(0, E, EB):
        e, j, c_ok, col = _expert_cols(e0, E, r, EB, RP)
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
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, CDT: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    e0 = tl.program_id(1) * EB
    e, j, c_ok, col = _expert_cols(e0, E, r, EB, RP)
    nn = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_T, EB * RP], dtype=tl.float32)
    for n0 in range(0, D_OUT, BLOCK_N):
        n_ok = (n0 + nn) < D_OUT
        go = tl.load(do_ptr + t64[:, None] * sdt + (n0 + nn)[None, :] * sdn,
                     mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + e[None, :] * sbe + (n0 + nn)[:, None] * sbn + j[None, :] * sbr,
                     mask=c_ok[None, :] & n_ok[:, None], other=0.0)
        acc = _mm(go, bt, acc, CDT)
    dhg = acc * scale
    h, g = _load_hg(h_ptr, g_ptr, sgt, sge, t64, t_ok, e, c_ok, col, E, r)
    dg = tl.sum(tl.reshape(dhg * h, (BLOCK_T, EB, RP)), axis=2)
    eg = e0 + tl.arange(0, EB)
    tl.store(dg_ptr + t64[:, None] * E + eg[None, :], dg, mask=t_ok[:, None] & (eg < E)[None, :])
    tl.store(dh_ptr + t64[:, None] * (E * r) + col[None, :], dhg * g, mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _bwd_dx_kernel(
    dh_ptr, a_ptr, sae, sar, sad, dx_ptr, sxt, sxd, T, D_IN, E, r,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, CDT: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D_IN
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for e0 in range(0, E, EB):
        e, j, c_ok, col = _expert_cols(e0, E, r, EB, RP)
        dh = tl.load(dh_ptr + t64[:, None] * (E * r) + col[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        at = tl.load(a_ptr + e[:, None] * sae + j[:, None] * sar + d[None, :] * sad,
                     mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mm(dh, at, acc, CDT)
    tl.store(dx_ptr + t64[:, None] * sxt + d[None, :] * sxd, acc.to(dx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dA_kernel(
    dh_ptr, x_ptr, sxt, sxd, part_ptr, T, D_IN, E, r, t_chunk,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, CDT: tl.constexpr,
):
    e, j, c_ok, col = _expert_cols(tl.program_id(0) * EB, E, r, EB, RP)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D_IN
    split = tl.program_id(2)
    t_start = split * t_chunk
    t_end = tl.minimum(t_start + t_chunk, T)
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros([EB * RP, BLOCK_D], dtype=tl.float32)
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
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, EB: tl.constexpr, RP: tl.constexpr, CDT: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D_OUT
    e, j, c_ok, col = _expert_cols(tl.program_id(1) * EB, E, r, EB, RP)
    split = tl.program_id(2)
    t_start = split * t_chunk
    t_end = tl.minimum(t_start + t_chunk, T)
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_N, EB * RP], dtype=tl.float32)
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


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape. EB * RP columns per expert block (>= 16 so tl.dot is legal on the GPU)."""

    block_t: int
    block_k: int  # tile of d_in / d_out in the GEMM loops and output tiles
    experts_per_block: int
    rank_pad: int
    split_t: int  # programs per column tile in the T-reductions of dA / dB (fixed-order sum after)


def pick_config(T: int, d_in: int, d_out: int, E: int, r: int, device: torch.device) -> KernelConfig:
    """Heuristic instead of @triton.autotune (which fails under the interpreter with >1 config)."""
    rp = triton.next_power_of_2(r)
    interp = interpreting() or device.type != "cuda"
    cols = 256 if interp else 128
    eb = min(triton.next_power_of_2(E), max(1, cols // rp))
    eb = max(eb, max(1, 16 // rp))
    block_t = 128 if interp else 64
    block_k = 128 if interp else 64
    n_t = triton.cdiv(max(T, 1), block_t)
    if interp:
        split = min(2, n_t)
    else:
        progs = triton.cdiv(E, eb) * triton.cdiv(max(d_in, d_out), block_k)
        split = max(1, min(n_t, triton.cdiv(2 * sm_count(device), progs)))
    return KernelConfig(block_t, block_k, eb, rp, split)


def _cdt(*tensors: torch.Tensor):
    dtypes = [t.dtype for t in tensors]
    return tl.float32 if dot_in_fp32(*dtypes) else _TL_DTYPE[dtypes[0]]


def loramoe_delta_forward(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scale: float,
    base: torch.Tensor | None = None, config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, h). out is `base` updated in place when given, else a new [T, d_out] tensor in x's dtype;
    h [T, E*r] fp32 is kept for the backward."""
    T, d_in = x.shape
    E, r, _ = A.shape
    d_out = B.shape[1]
    cfg = config or pick_config(T, d_in, d_out, E, r, x.device)
    h = new_empty((T, E * r), torch.float32, x.device)
    out = base if base is not None else new_empty((T, d_out), x.dtype, x.device)
    if T == 0 or d_out == 0:
        return out, h
    cdt = _cdt(x, A, B)
    n_eb = triton.cdiv(E, cfg.experts_per_block)
    _fwd_h_kernel[(triton.cdiv(T, cfg.block_t), n_eb)](
        x, x.stride(0), x.stride(1), A, A.stride(0), A.stride(1), A.stride(2), h, T, d_in, E, r,
        BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, EB=cfg.experts_per_block, RP=cfg.rank_pad, CDT=cdt)
    _fwd_out_kernel[(triton.cdiv(T, cfg.block_t), triton.cdiv(d_out, cfg.block_k))](
        h, gates, gates.stride(0), gates.stride(1), B, B.stride(0), B.stride(1), B.stride(2),
        out, out.stride(0), out.stride(1), T, d_out, E, r, float(scale),
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_k, EB=cfg.experts_per_block, RP=cfg.rank_pad, CDT=cdt,
        ACCUMULATE=base is not None)
    return out, h


def loramoe_delta_backward(
    dout: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor,
    h: torch.Tensor, scale: float, needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB, dgates); an entry is None where `needs` (x, A, B, gates) says it is not wanted."""
    T, d_in = x.shape
    E, r, _ = A.shape
    d_out = B.shape[1]
    dev = x.device
    cfg = config or pick_config(T, d_in, d_out, E, r, dev)
    eb, rp, bt, bk = cfg.experts_per_block, cfg.rank_pad, cfg.block_t, cfg.block_k
    n_eb = triton.cdiv(E, eb)
    split = max(1, min(cfg.split_t, triton.cdiv(max(T, 1), bt)))
    t_chunk = triton.cdiv(triton.cdiv(max(T, 1), split), bt) * bt
    split = triton.cdiv(max(T, 1), t_chunk)
    need_x, need_a, need_b, need_g = needs
    cdt_out = _cdt(dout, B)
    dx = dA = dB = dg = None

    if need_x or need_a or need_g:
        dh = new_empty((T, E * r), torch.float32, dev)
        dg32 = new_empty((T, E), torch.float32, dev)
        if T > 0:
            _bwd_h_kernel[(triton.cdiv(T, bt), n_eb)](
                dout, dout.stride(0), dout.stride(1), B, B.stride(0), B.stride(1), B.stride(2),
                h, gates, gates.stride(0), gates.stride(1), dh, dg32, T, d_out, E, r, float(scale),
                BLOCK_T=bt, BLOCK_N=bk, EB=eb, RP=rp, CDT=cdt_out)
        if need_g:
            dg = dg32.to(gates.dtype)
        if need_x:
            dx = new_empty((T, d_in), x.dtype, dev)
            if T > 0:
                _bwd_dx_kernel[(triton.cdiv(T, bt), triton.cdiv(d_in, bk))](
                    dh, A, A.stride(0), A.stride(1), A.stride(2), dx, dx.stride(0), dx.stride(1), T, d_in, E, r,
                    BLOCK_T=bt, BLOCK_D=bk, EB=eb, RP=rp, CDT=_cdt(A))
        if need_a:
            if T == 0:
                dA = torch.zeros_like(A)
            else:
                part = new_empty((split, E * r, d_in), torch.float32, dev)
                _bwd_dA_kernel[(n_eb, triton.cdiv(d_in, bk), split)](
                    dh, x, x.stride(0), x.stride(1), part, T, d_in, E, r, t_chunk,
                    BLOCK_T=bt, BLOCK_D=bk, EB=eb, RP=rp, CDT=_cdt(x))
                dA = part.sum(0).view(E, r, d_in).to(A.dtype)
    if need_b:
        if T == 0:
            dB = torch.zeros_like(B)
        else:
            part = new_empty((split, E, d_out, r), torch.float32, dev)
            _bwd_dB_kernel[(triton.cdiv(d_out, bk), n_eb, split)](
                dout, dout.stride(0), dout.stride(1), h, gates, gates.stride(0), gates.stride(1), part,
                T, d_out, E, r, float(scale), t_chunk,
                BLOCK_T=bt, BLOCK_N=bk, EB=eb, RP=rp, CDT=_cdt(dout))
            dB = part.sum(0).to(B.dtype)
    return dx, dA, dB, dg


class LoRAMoEDeltaFunction(torch.autograd.Function):
    """Autograd wrapper: inputs (x, A, B, dense gates [T, E], base or None, scale)."""

    @staticmethod
    def forward(ctx, x, A, B, gates, base, scale):
        out, h = loramoe_delta_forward(x, A, B, gates, scale, base)
        if any(ctx.needs_input_grad[:4]):
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
