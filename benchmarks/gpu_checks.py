"""Correctness checks of the compiled kernels beyond the unit tests, for benchmarks/gpu_validate.sh.

On a CUDA device (TRITON_INTERPRET unset) the Triton kernels run compiled. First the headline shapes, with
the gradient values of the forward+backward compared to the fp32 torch reference (dense E=8 r=16 and routed
E=64 top-4, bf16), then fp32/fp16, ranks, ragged sizes, strided views, poisoned output buffers, several token
tiles per program, routing counts on tie-free logits (fp32 and bf16, top-4 and top-8), tied logits against a
lowest-index rule, offsets past int32, the CUDA extension when built and a second device when there is one.
With --tiny (the CPU dry run, TRITON_INTERPRET=1) the same kinds run through the interpreter on tiny shapes.
Every check compares with the torch reference in fp32; a low-precision result may be at most 2x as far from
it as torch's own computation in that dtype, plus a small floor.

    python benchmarks/gpu_checks.py --out checks.json [--tiny] [--budget-s 170]
    python benchmarks/gpu_checks.py --preflight [--tiny]    # versions, what is missing (exit 1 if unusable), plan
    python benchmarks/gpu_checks.py --plan [--tiny]         # the checks and benchmark rows it would run

checks.json is rewritten after every check (a run cut off keeps its rows); each row records its seconds and
the Triton compiles it caused. Checks started after --budget-s is spent are recorded as skipped. Exit status
1 when any check fails (all checks still run and are written).
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
from harness import Budget, RowLog, compiled_variants, environment, tie_free_logits  # noqa: E402

from moe_unlearn.ops import loramoe_delta, loramoe_delta_torch, routing_stats, routing_stats_torch  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def poisoned_buffers():
    """Every buffer the Triton launchers allocate starts as NaN (floats) or -12345 (ints)."""
    import moe_unlearn.kernels.loramoe_delta as ld
    import moe_unlearn.kernels.loramoe_routed as lr
    import moe_unlearn.kernels.routing_stats as rs

    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-12345)

    saved = ld.new_empty, lr.new_empty, rs.new_empty
    ld.new_empty = lr.new_empty = rs.new_empty = poisoned
    try:
        yield
    finally:
        ld.new_empty, lr.new_empty, rs.new_empty = saved


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
    """The routed kernels (pairs sorted by expert), called directly whatever routed_pays would pick: forward
    and gradients in x, A, B and the weights against the dense fp32 torch reference."""
    from moe_unlearn.kernels.loramoe_routed import loramoe_delta_routed_triton

    def routed(x, A, B, *, topk_idx, topk_weight, scale, backend):
        return loramoe_delta_routed_triton(x, A, B, topk_idx, topk_weight, scale=scale)

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

    got = run(dtype, routed, backend="triton")
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


def routing_case(device, T, E, K, S, dtype, *, sort=True, mask=True, given=False, neg_inf_rows=False,
                 ties=False, seed=0) -> dict:
    """Counts and sums against the torch reference. Logits are tie-free (exact counts); with `ties` every
    row repeats values, and the reference selection is the kernel's rule: highest logit, lowest index first."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = tie_free_logits(T, E, g)
    if ties:
        logits = (logits * 0.5).floor()  # each value shared by about two experts
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
    if ties:  # stable descending sort = lowest index first among equal logits
        kw["topk_idx"] = torch.sort(-lg.float(), dim=1, stable=True).indices[:, :K]
    elif neg_inf_rows:
        kw["topk_idx"] = got.topk_idx
    ref = routing_stats_torch(lg, return_topk=True, **kw)
    ok = torch.equal(got.select_count, ref.select_count) and torch.equal(got.tokens_per_seq, ref.tokens_per_seq)
    ok &= bool(torch.allclose(got.gate_sum, ref.gate_sum, rtol=1e-4, atol=1e-3))
    ok &= bool(torch.allclose(got.score_sum, ref.score_sum, rtol=1e-4, atol=1e-3))
    if not neg_inf_rows:
        ok &= torch.equal(got.topk_idx, ref.topk_idx)
    else:
        ok &= bool((got.topk_idx.sort(1).values.diff(dim=1) > 0).all())  # K distinct experts per token
    err = (got.gate_sum - ref.gate_sum).abs().max().item() if got.gate_sum.numel() else 0.0
    return {"ok": bool(ok), "gate_sum_err": err}


HEADLINE = (16384, 4096, 4096, 8, 16)  # T, d_in, d_out, E, r: the dense goal shape
HEADLINE_ROUTED = (16384, 4096, 4096, 64, 16, 4)  # ... E=64, top-4: the routed goal shape


def _dn(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def checks(device: torch.device, tiny: bool) -> list[tuple[str, callable]]:
    """Every check, most important first (a run cut short keeps those). Shapes and dtypes are chosen to
    bound the number of Triton compiles on the GPU (each distinct dtype / rank / stride pattern compiles
    every kernel of its path once; ~1-3 s each with Triton 3.6)."""
    out = []
    bf = torch.bfloat16
    head = (37, 24, 19, 3, 16) if tiny else HEADLINE
    rhead = (13, 24, 20, 6, 16, 4) if tiny else HEADLINE_ROUTED
    out.append(("lora_headline_grads_bf16", lambda: lora_case(device, *head, bf, seed=1)))
    out.append(("lora_routed_headline_grads_bf16", lambda: routed_case(device, *rhead, bf, seed=2)))
    for E, K in ((64, 8), (64, 4)):
        for dtype in (torch.float32, bf):
            dn = _dn(dtype)
            T = 70 if tiny else 20011
            out.append((f"routing_E{E}_K{K}_{dn}", lambda E=E, K=K, d=dtype, T=T: routing_case(device, T, E, K, 7, d)))
    T = 50 if tiny else 9973
    out.append(("routing_ties_bf16", lambda T=T: routing_case(device, T, 16, 4, 5, bf, ties=True)))
    ragged = (45, 40, 22, 5, 8) if tiny else (3001, 520, 264, 8, 16)
    for dtype in (torch.float32,) if tiny else (torch.float32, torch.float16):
        dn = _dn(dtype)
        out.append((f"lora_ragged_{dn}", lambda d=dtype: lora_case(device, *ragged, d, seed=3)))
    rshape = (13, 24, 20, 5, 16, 2) if tiny else (2011, 264, 200, 64, 16, 4)
    for dtype in (torch.float32,) if tiny else (torch.float32, torch.float16):
        dn = _dn(dtype)
        out.append((f"lora_routed_topk_{dn}", lambda d=dtype: routed_case(device, *rshape, d)))
    for r in (3, 130) if tiny else (1, 4, 64, 130, 256):
        shape = (37, 24, 19, 3, r) if tiny else (1237, 384, 328, 6, r)
        out.append((f"lora_rank{r}_bf16", lambda s=shape: lora_case(device, *s, bf, seed=s[-1])))
    out.append(("lora_strided_bf16", lambda: lora_case(device, *ragged, bf, strided=True)))

    def poisoned():
        with poisoned_buffers():
            return lora_case(device, *ragged, bf, seed=5)
    out.append(("lora_poisoned_bf16", poisoned))

    def routed_poisoned():
        with poisoned_buffers():
            return routed_case(device, *rshape, bf, seed=8)
    out.append(("lora_routed_poisoned_bf16", routed_poisoned))

    def tiles():
        with few_programs():
            return lora_case(device, *ragged, bf, seed=6)
    out.append(("lora_several_tiles_per_program_bf16", tiles))
    T = 70 if tiny else 20011
    for E, K in ((3, 2),) if tiny else ((1, 1), (3, 2), (100, 6), (256, 8)):
        out.append((f"routing_E{E}_K{K}_bf16", lambda E=E, K=K, T=T: routing_case(device, T, E, K, 7, bf)))
    T = 50 if tiny else 9973
    out.append(("routing_unsorted_given_bf16", lambda T=T: routing_case(device, T, 10, 3, 5, bf, sort=False, given=True)))
    out.append(("routing_neg_inf_rows_bf16", lambda T=T: routing_case(device, T, 8, 4, 3, bf, neg_inf_rows=True)))

    def rpoison(T=T):
        with poisoned_buffers(), few_programs():
            return routing_case(device, T, 12, 2, 9, bf, mask=False)
    out.append(("routing_poisoned_many_tiles_bf16", rpoison))
    if not tiny and device.type == "cuda":
        out += _large_checks(device)
    return out


def _large_checks(device: torch.device) -> list[tuple[str, callable]]:
    """Offsets past int32, a second device and the CUDA extension: GPU only."""
    out = []

    def lora_int32():  # row offsets past 2^31 elements: the last rows match the reference on a slice
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
        g = torch.Generator(device="cpu").manual_seed(11)
        logits = tie_free_logits(1 << 16, E, g).to(device=device, dtype=torch.bfloat16).repeat(T // (1 << 16) + 1, 1)[:T]
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

    if cuda_extension() is not None:
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
            return _compare(["out"], [got], [ref], [low], torch.bfloat16)
        out.append(("cuda_extension_bf16", cuda_ext))
    return out


EXPECTED = {"torch": "2.11", "triton": "3.6"}  # the lent GPU machine's versions


def preflight(tiny: bool) -> int:
    """Print versions and what the run needs; 1 when the run cannot work (no CUDA on a GPU run, no Triton,
    TRITON_INTERPRET set for compiled kernels, the package not importable)."""
    import importlib.metadata
    import importlib.util
    import os
    import platform

    problems = []
    print(f"python {platform.python_version()} torch {torch.__version__} (CUDA {torch.version.cuda}) "
          f"cuda_available={torch.cuda.is_available()} devices={torch.cuda.device_count()}")
    versions = {"torch": torch.__version__}
    for dist in ("triton", "numpy", "transformers", "setuptools", "pip"):  # metadata only: no slow imports
        try:
            versions[dist] = importlib.metadata.version(dist)
            print(f"{dist} {versions[dist]}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{dist}: not installed")
    if importlib.util.find_spec("triton") is None:
        problems.append("triton is not importable")
    for mod, want in EXPECTED.items():
        have = versions.get(mod)
        if have and not have.startswith(want):
            print(f"note: {mod} {have} here; the lent GPU machine has {want}")
    import moe_unlearn

    print(f"moe_unlearn {moe_unlearn.__version__} from {Path(moe_unlearn.__file__).parent}")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if tiny:
        if not interp:
            problems.append("--tiny runs the interpreter: set TRITON_INTERPRET=1")
    else:
        if not torch.cuda.is_available():
            problems.append("no CUDA device visible to torch")
        if interp:
            problems.append("TRITON_INTERPRET=1 is set: compiled kernels need it unset")
        else:
            for dev in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(dev)
                print(f"cuda:{dev} {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs "
                      f"{p.total_memory / 2**30:.0f} GiB")
    for prob in problems:
        print(f"PROBLEM: {prob}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path)
    mode.add_argument("--preflight", action="store_true")
    mode.add_argument("--plan", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run under TRITON_INTERPRET=1)")
    p.add_argument("--budget-s", type=float, default=None, help="start no check after this many seconds")
    args = p.parse_args(argv)
    if args.preflight and preflight(args.tiny):
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    todo = checks(device, args.tiny)
    if args.plan or args.preflight:
        import bench_ops

        print(f"checks ({len(todo)}, {'tiny, interpreter' if args.tiny else device.type}): "
              + " ".join(name for name, _ in todo))
        for line in bench_ops.plan(args.tiny):
            print(f"bench {line}")
        return 0
    budget = Budget(args.budget_s)
    log = RowLog(args.out, {"environment": environment(device), "tiny": args.tiny, "planned": len(todo),
                            "budget_s": args.budget_s, "failed": [], "skipped": []}, key="checks")
    for name, fn in todo:
        if budget.spent():
            log.add({"name": name, "ok": None, "skipped": "time budget spent"})
            log.update(skipped=[*log.payload["skipped"], name])
            print(f"skip {name} (time budget spent)", flush=True)
            continue
        t0, c0 = time.perf_counter(), compiled_variants()
        try:
            res = fn()
        except Exception as exc:  # a crashing check is a failed check; the others still run
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        res = {"name": name, **res, "seconds": round(time.perf_counter() - t0, 3),
               "triton_compiles": compiled_variants() - c0}
        if not res["ok"]:
            log.payload["failed"].append(name)
        log.add(res)
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {name} {res.get('err_over_allowed', res.get('error', ''))} "
              f"{res['seconds']}s compiles={res['triton_compiles']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = log.payload["failed"]
    log.update(triton_compiles=compiled_variants(), complete=True)
    done = sum(1 for r in log.rows if r["ok"] is not None)
    print(f"{done - len(failed)}/{done} checks passed, {len(log.payload['skipped'])} skipped; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
