"""Correctness checks of the compiled kernels beyond the unit tests, for benchmarks/gpu_validate.sh.

On a CUDA device (TRITON_INTERPRET unset) the Triton kernels run compiled: ragged sizes, strided views,
poisoned output buffers, ranks 1..256, offsets past int32, several token tiles per program, the CUDA
extension when built, and two devices when there are two. With --tiny (the CPU dry run, TRITON_INTERPRET=1)
the same checks run through the interpreter on tiny shapes, so the script cannot rot. Every check compares
with the torch reference in fp32; a low-precision result may be at most 2x as far from it as torch's own
computation in that dtype, plus a small floor.

    python benchmarks/gpu_checks.py --out checks.json [--tiny]

Exit status 1 when any check fails (all checks still run and are written).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, write_json  # noqa: E402

from moe_unlearn.ops import loramoe_delta, loramoe_delta_torch, routing_stats, routing_stats_torch  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def poisoned_buffers():
    """Every buffer the Triton launchers allocate starts as NaN (floats) or -12345 (ints)."""
    import moe_unlearn.kernels.loramoe_delta as ld
    import moe_unlearn.kernels.routing_stats as rs

    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-12345)

    saved = ld.new_empty, rs.new_empty
    ld.new_empty = rs.new_empty = poisoned
    try:
        yield
    finally:
        ld.new_empty, rs.new_empty = saved


@contextlib.contextmanager
def few_programs():
    """Pretend the device has one SM so the persistent kernels walk several token tiles per program."""
    import moe_unlearn.kernels._common as kc
    import moe_unlearn.kernels.loramoe_delta as ld
    import moe_unlearn.kernels.routing_stats as rs

    saved = ld.sm_count, rs.sm_count, kc.sm_count
    ld.sm_count = rs.sm_count = kc.sm_count = lambda device: 1
    try:
        yield
    finally:
        ld.sm_count, rs.sm_count, kc.sm_count = saved


def _grads(fn, x, A, B, gates, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, gates)]
    out = fn(*leaves, **kw)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def lora_case(device, T, d_in, d_out, E, r, dtype, *, strided=False, backward=True, seed=0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d_in * (2 if strided else 1), generator=g)
    x = x[:, ::2] if strided else x
    A = torch.randn(E, r, d_in, generator=g) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=g) / r**0.5
    gates = torch.softmax(torch.randn(T, E, generator=g), -1)
    dout = torch.randn(T, d_out, generator=g)
    if strided:
        A = A.transpose(1, 2).contiguous().transpose(1, 2)
        B = B.permute(1, 0, 2).contiguous().permute(1, 0, 2)
        gates = gates.t().contiguous().t()
    lo = [t.to(device=device, dtype=dtype) for t in (x, A, B, gates, dout)]
    hi = [t.to(device=device, dtype=torch.float32) for t in (x, A, B, gates, dout)]
    if backward:
        got = _grads(loramoe_delta, *lo, scale=2.0, backend="triton")
        ref = _grads(loramoe_delta_torch, *hi, scale=2.0)
        low = _grads(loramoe_delta_torch, *lo, scale=2.0)
    else:
        with torch.no_grad():
            got = [loramoe_delta(*lo[:4], scale=2.0, backend="triton")]
            ref = [loramoe_delta_torch(*hi[:4], scale=2.0)]
            low = [loramoe_delta_torch(*lo[:4], scale=2.0)]
    return _compare(["out", "dx", "dA", "dB", "dgates"], got, ref, low, dtype)


def routed_case(device, T, d_in, d_out, E, r, K, dtype, seed=0) -> dict:
    """Top-K with many experts (pairs sorted by expert): forward and gradients in x, A, B and the weights."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    A = torch.randn(E, r, d_in, generator=g) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=g) / r**0.5
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)]).to(device)  # expert E-1 unused
    w = torch.rand(T, K, generator=g)
    dout = torch.randn(T, d_out, generator=g)

    def run(dt, fn, **kw):
        leaves = [t.to(device=device, dtype=dt).requires_grad_() for t in (x, A, B, w)]
        out = fn(leaves[0], leaves[1], leaves[2], topk_idx=idx, topk_weight=leaves[3], scale=2.0, **kw)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(device=device, dtype=dt))]

    got = run(dtype, loramoe_delta, backend="triton")
    res = _compare(["out", "dx", "dA", "dB", "dweight"], got, run(torch.float32, loramoe_delta_torch),
                   run(dtype, loramoe_delta_torch), dtype)
    res["ok"] = bool(res["ok"] and not got[3][E - 1].any() and not got[2][E - 1].any())
    return res


def _compare(names, got, ref, low, dtype) -> dict:
    worst, ok, detail = 0.0, True, {}
    for name, a, b, c in zip(names, got, ref, low, strict=False):
        if a.shape != b.shape or not torch.isfinite(a.float()).all():
            ok = False
            detail[name] = "non-finite or wrong shape"
            continue
        err = (a.float() - b).abs().max().item() if a.numel() else 0.0
        scale = b.abs().max().item() if b.numel() else 0.0
        floor = (1e-4 if dtype == torch.float32 else 4e-3) * scale + 1e-6
        allowed = floor if dtype == torch.float32 else 2 * ((c.float() - b).abs().max().item() if c.numel() else 0) + floor
        detail[name] = round(err, 7)
        worst = max(worst, err / max(allowed, 1e-12))
        ok &= err <= allowed
    return {"ok": bool(ok), "err_over_allowed": round(worst, 4), "errors": detail}


def routing_case(device, T, E, K, S, dtype, *, sort=True, mask=True, given=False, neg_inf_rows=False, seed=0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    ranks = torch.argsort(torch.rand(T, E, generator=g), dim=1).float()
    logits = ranks * (4.0 / E) - 2.0 + 0.01 * torch.rand(T, E, generator=g)  # no ties, even in bf16
    if neg_inf_rows:
        logits[::3, 1:] = float("-inf")
    seq = torch.randint(0, S, (T,), generator=g)
    seq = seq.sort().values if sort else seq
    m = torch.rand(T, generator=g) > 0.2 if mask else None
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if given else None
    kw = dict(top_k=K, seq_ids=seq.to(device), num_seqs=S, mask=None if m is None else m.to(device),
              topk_idx=None if idx is None else idx.to(device))
    lg = logits.to(device=device, dtype=dtype)
    got = routing_stats(lg, backend="triton", return_topk=True, seq_sorted=True if sort else None, **kw)
    ref = routing_stats_torch(lg, return_topk=True, **kw) if not neg_inf_rows else \
        routing_stats_torch(lg, return_topk=True, **{**kw, "topk_idx": got.topk_idx})
    ok = torch.equal(got.select_count, ref.select_count) and torch.equal(got.tokens_per_seq, ref.tokens_per_seq)
    ok &= bool(torch.allclose(got.gate_sum, ref.gate_sum, rtol=1e-4, atol=1e-3))
    ok &= bool(torch.allclose(got.score_sum, ref.score_sum, rtol=1e-4, atol=1e-3))
    if not neg_inf_rows:
        ok &= torch.equal(got.topk_idx, ref.topk_idx)
    else:
        ok &= bool((got.topk_idx.sort(1).values.diff(dim=1) > 0).all())  # K distinct experts per token
    err = (got.gate_sum - ref.gate_sum).abs().max().item() if got.gate_sum.numel() else 0.0
    return {"ok": bool(ok), "gate_sum_err": err}


def checks(device: torch.device, tiny: bool) -> list[tuple[str, callable]]:
    """Every kind of check; --tiny runs each kind once (bf16, two ranks) to keep the CPU dry run short."""
    out = []
    ranks = (3, 130) if tiny else (1, 2, 4, 8, 16, 32, 64, 100, 128, 200, 256)
    for dtype in (torch.bfloat16,) if tiny else DTYPES:
        dn = str(dtype).split(".")[-1]
        for r in ranks:
            shape = (37, 24, 19, 3, r) if tiny else (1237, 384, 328, 6, r)
            out.append((f"lora_rank{r}_{dn}", lambda s=shape, d=dtype: lora_case(device, *s, d, seed=s[-1])))
        shape = (45, 40, 22, 5, 8) if tiny else (3001, 520, 264, 8, 16)
        out.append((f"lora_strided_{dn}", lambda s=shape, d=dtype: lora_case(device, *s, d, strided=True)))

        rshape = (29, 24, 20, 20, 16, 2) if tiny else (2011, 264, 200, 64, 16, 4)
        out.append((f"lora_routed_topk_{dn}", lambda s=rshape, d=dtype: routed_case(device, *s, d)))

        def poisoned(s=shape, d=dtype):
            with poisoned_buffers():
                return lora_case(device, *s, d, seed=5)
        out.append((f"lora_poisoned_{dn}", poisoned))

        def tiles(s=shape, d=dtype):
            with few_programs():
                return lora_case(device, *s, d, seed=6)
        out.append((f"lora_several_tiles_per_program_{dn}", tiles))
        for E, K in ((64, 8),) if tiny else ((1, 1), (3, 2), (64, 8), (100, 6), (256, 8)):
            T = 70 if tiny else 20011
            out.append((f"routing_E{E}_K{K}_{dn}", lambda E=E, K=K, d=dtype, T=T: routing_case(device, T, E, K, 7, d)))
        T = 50 if tiny else 9973
        out.append((f"routing_unsorted_given_{dn}",
                    lambda d=dtype, T=T: routing_case(device, T, 10, 3, 5, d, sort=False, given=True)))
        out.append((f"routing_neg_inf_rows_{dn}",
                    lambda d=dtype, T=T: routing_case(device, T, 8, 4, 3, d, neg_inf_rows=True)))

        def rpoison(d=dtype, T=T):
            with poisoned_buffers(), few_programs():
                return routing_case(device, T, 12, 2, 9, d, mask=False)
        out.append((f"routing_poisoned_many_tiles_{dn}", rpoison))
    if not tiny and device.type == "cuda":
        # Row offsets past 2^31 elements: the last rows must match the reference computed on a slice.
        def lora_int32():
            T, d = (1 << 31) // 4096 + 77, 4096
            x = torch.randn(T, d, device=device, dtype=torch.bfloat16)
            A = (torch.randn(8, 16, d, device=device) / 64).bfloat16()
            B = (torch.randn(8, d, 16, device=device) / 4).bfloat16()
            gates = torch.softmax(torch.randn(T, 8, device=device), -1).bfloat16()
            with torch.no_grad():
                out = loramoe_delta(x, A, B, gates, backend="triton")
                tail = slice(T - 300, T)
                ref = loramoe_delta_torch(x[tail].float(), A.float(), B.float(), gates[tail].float())
                low = loramoe_delta_torch(x[tail], A, B, gates[tail])
            return _compare(["out_tail"], [out[tail]], [ref], [low], torch.bfloat16)
        out.append(("lora_offsets_past_int32_bf16", lora_int32))

        def routing_int32():
            T, E = (1 << 31) // 64 + 1001, 64
            logits = torch.randn(T, E, device=device, dtype=torch.bfloat16)
            seq = torch.arange(T, device=device) * 4 // T
            got = routing_stats(logits, top_k=8, seq_ids=seq, num_seqs=4, seq_sorted=True, backend="triton")
            ref = routing_stats_torch(logits, top_k=8, seq_ids=seq, num_seqs=4)
            ok = torch.equal(got.select_count, ref.select_count) and torch.equal(got.tokens_per_seq, ref.tokens_per_seq)
            return {"ok": bool(ok and torch.allclose(got.gate_sum, ref.gate_sum, rtol=1e-3))}
        out.append(("routing_offsets_past_int32_bf16", routing_int32))
        if torch.cuda.device_count() >= 2:
            def second_device():
                d1 = torch.device("cuda", 1)
                res = lora_case(d1, 1000, 256, 192, 6, 16, torch.bfloat16)
                res["current_device"] = torch.cuda.current_device()
                return res
            out.append(("lora_on_cuda1", second_device))
    from moe_unlearn.ops.dispatch import cuda_extension

    if device.type == "cuda" and cuda_extension() is not None:
        def cuda_ext():
            g = torch.Generator(device="cpu").manual_seed(3)
            x, A, B = torch.randn(1000, 256, generator=g), torch.randn(6, 8, 256, generator=g) / 16, \
                torch.randn(6, 192, 8, generator=g) / 3
            gates = torch.softmax(torch.randn(1000, 6, generator=g), -1)
            args = [t.to(device, torch.bfloat16) for t in (x, A, B, gates)]
            with torch.no_grad():
                got = loramoe_delta(*args, backend="cuda")
            ref = loramoe_delta_torch(*[a.float() for a in args])
            low = loramoe_delta_torch(*args)
            res = _compare(["out"], [got], [ref], [low], torch.bfloat16)
            lg = torch.randn(5003, 64, generator=g).to(device)
            seq = torch.randint(0, 37, (5003,), generator=g).to(device)
            a = routing_stats(lg, top_k=6, seq_ids=seq, num_seqs=37, backend="cuda")
            b = routing_stats_torch(lg, top_k=6, seq_ids=seq, num_seqs=37)
            res["ok"] = bool(res["ok"] and torch.equal(a.select_count, b.select_count)
                             and torch.allclose(a.gate_sum, b.gate_sum, rtol=1e-4, atol=1e-3))
            return res
        out.append(("cuda_extension_bf16", cuda_ext))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    results = []
    for name, fn in checks(device, args.tiny):
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as exc:  # a crashing check is a failed check; the others still run
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        res = {"name": name, **res, "seconds": round(time.perf_counter() - t0, 3)}
        results.append(res)
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {name} {res.get('err_over_allowed', res.get('error', ''))}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [r["name"] for r in results if not r["ok"]]
    write_json(args.out, {"environment": environment(device), "tiny": args.tiny, "failed": failed,
                          "checks": results})
    print(f"{len(results) - len(failed)}/{len(results)} checks passed; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
