"""Microbenchmarks of the ops per backend and shape. Goals on an H100, bf16:
loramoe_delta forward at T=16384, d=4096, E=8, r=16: >= 70% of the measured copy bandwidth (floor: one
read of x, one write of the delta), >= 1.5x the stacked two-GEMM torch form, >= 5x the per-expert loop;
forward + backward >= 50%; routing_stats at T=1M, E=64, K=8: >= 80% of bandwidth and >= 5x a plain torch
softmax + topk + bincount.

    python benchmarks/bench_ops.py            # CUDA device: every available backend, goal shapes
    python benchmarks/bench_ops.py --cpu      # small torch-only shapes on the CPU
    python benchmarks/bench_ops.py --tiny     # tiny shapes, Triton through the interpreter (the CI dry run)
    python benchmarks/bench_ops.py --plan     # the rows it would run
    python benchmarks/bench_ops.py --table results.json   # the README's performance table from a results file

Writes --out (default benchmarks/results/ops_<device>_<date>.json), rewritten after every row so a run cut
off keeps what it measured; rows started after --budget-s are recorded as skipped. Every row has: median/p20/p80 ms with the L2 cache
flushed before each run (GPU), `bytes` = the minimum traffic of the op (inputs read once, outputs written
once), `gbs` and `bw_fraction` (of the measured copy bandwidth), `flops`, `tflops` and `flop_fraction` (of
a measured large bf16/fp16/fp32 matmul), `max_err` / `ok` against the fp32 torch reference (forward+backward
rows: every gradient's values, within twice torch's own error in that dtype), and `triton_compiles`.
`kernel` rows call the Triton launcher directly (no validation, no dispatch); `e2e` rows the public op.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Budget,
    RowLog,
    Timing,
    bench_ms,
    compiled_variants,
    copy_bandwidth_gbs,
    environment,
    matmul_tflops,
    tie_free_logits,
    timing_dict,
)

from moe_unlearn.ops import (  # noqa: E402
    dense_gates,
    loramoe_delta,
    loramoe_delta_loop,
    loramoe_delta_torch,
    routing_stats,
    routing_stats_torch,
)
from moe_unlearn.ops.api import routed_pays  # noqa: E402
from moe_unlearn.ops.dispatch import cuda_extension, triton_importable, triton_interpreting  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

GPU_LORA_SHAPES = [  # T, d_in, d_out, E, r, gating (dense | top-K)
    (16384, 4096, 4096, 8, 16, "dense"),  # the goal shape
    (16384, 4096, 4096, 8, 16, "top2"),
    (16384, 4096, 4096, 6, 4, "dense"),  # the LoRAMoE paper's E=6, r=4
    (16384, 4096, 4096, 64, 16, "top4"),
    (4096, 2048, 5632, 8, 64, "dense"),
]
CPU_LORA_SHAPES = [(2048, 512, 512, 8, 16, "dense"), (2048, 512, 512, 6, 4, "top2")]
TINY_LORA_SHAPES = [(48, 24, 16, 6, 4, "top2"), (12, 24, 16, 9, 32, "top4")]  # dense, routed
GPU_ROUTING_SHAPES = [  # T, E, K, sequences, logits dtype
    (1 << 20, 64, 8, 1024, "bf16"), (1 << 20, 64, 4, 1024, "bf16"), (1 << 20, 64, 8, 1024, "fp32"),
    (1 << 20, 64, 4, 1024, "fp32"), (1 << 20, 128, 8, 1024, "bf16"), (1 << 18, 8, 2, 256, "bf16"),
]
CPU_ROUTING_SHAPES = [(1 << 16, 64, 8, 64, "fp32"), (1 << 16, 8, 2, 64, "fp32")]
TINY_ROUTING_SHAPES = [(100, 64, 8, 4, "bf16"), (100, 64, 4, 4, "fp32")]


def lora_inputs(T, d_in, d_out, E, r, gating, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, d_in, device=device, dtype=dtype, generator=g)
    A = (torch.randn(E, r, d_in, device=device, generator=g) / d_in**0.5).to(dtype)
    B = (torch.randn(E, d_out, r, device=device, generator=g) / r**0.5).to(dtype)
    logits = torch.randn(T, E, device=device, generator=g)
    gates = torch.softmax(logits, -1)
    kw = {"gates": gates.to(dtype)}
    if gating != "dense":
        k = int(gating[3:])
        w, idx = torch.topk(gates, k, dim=-1)
        kw = {"topk_idx": idx, "topk_weight": w.to(dtype)}
    return x, A, B, gates.to(dtype), kw


def checked_timing(fn, device: torch.device, runs: int):
    """(first result, Timing). With one run on the CPU (the interpreter's dry run, where times mean nothing)
    the call that is checked is the one timed, so each row costs one call instead of two."""
    if runs <= 1 and device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - t0) * 1e3
        return out, Timing(ms, ms, ms, 1)
    out = fn()
    return out, bench_ms(fn, device, runs=runs)


def _max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.float() - ref).abs().max().item() if got.numel() else 0.0


def _rate_fields(nbytes: float, flops: float, ms: float, bandwidth: float, peak_tflops: float) -> dict:
    s = ms * 1e-3
    return {"bytes": int(nbytes), "gbs": nbytes / s / 1e9, "bw_fraction": nbytes / s / 1e9 / bandwidth,
            "flops": int(flops), "tflops": flops / s / 1e12, "flop_fraction": flops / s / 1e12 / peak_tflops}


class Rows:
    """Where rows go: the results file (rewritten after each row) and the time budget that skips the rest."""

    def __init__(self, log: RowLog | None, budget: Budget):
        self.log, self.budget, self.list = log, budget, []

    def run(self, row: dict, measure) -> dict | None:
        """row: the identifying fields; measure() -> the measured fields. Returns the finished row, or None
        when the budget is spent (the row is recorded as skipped)."""
        if self.budget.spent():
            row = {**row, "ok": None, "skipped": "time budget spent"}
        else:
            c0 = compiled_variants()
            try:
                row = {**row, **measure()}
            except Exception as exc:  # a crashing row is a failed row; the others still run
                row = {**row, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            row["triton_compiles"] = compiled_variants() - c0
        self.list.append(row)
        if self.log is not None:
            self.log.add(row)
        return row if row.get("ok") is not None and "error" not in row else None

    def flush(self) -> None:
        if self.log is not None:
            self.log.write()


def _grads_close(got, ref, low, scale_floor=4e-3) -> tuple[bool, float]:
    """Every gradient within twice torch's own low-precision error of the fp32 reference (plus a floor)."""
    worst, ok = 0.0, True
    for a, b, c in zip(got, ref, low, strict=True):
        b = b.float()
        err = _max_err(a, b)
        allowed = 2 * _max_err(c, b) + scale_floor * (b.abs().max().item() if b.numel() else 0.0) + 1e-6
        worst = max(worst, err / allowed)
        ok &= bool(torch.isfinite(a.float()).all()) and err <= allowed
    return ok, worst


def bench_lora(rows: Rows, shapes, dtype_name, device, backends, runs, bandwidth, peak, with_backward=True):
    for shape in shapes:
        _bench_lora_shape(rows, *shape, dtype_name, device, backends, runs, bandwidth, peak, with_backward)


def _bench_lora_shape(rows: Rows, T, d_in, d_out, E, r, gating, dtype_name, device, backends, runs, bandwidth, peak,
                      with_backward):
    dtype = DTYPES[dtype_name]
    x, A, B, dense, kw = lora_inputs(T, d_in, d_out, E, r, gating, dtype, device)
    es = x.element_size()
    # Minimum traffic: x read once, delta written once, A, B and the gates read once.
    fwd_bytes = (T * d_in + T * d_out + A.numel() + B.numel() + T * E) * es
    # + backward: dout read, x read again, dx written (dA, dB, dgates are small).
    bwd_bytes = fwd_bytes + (T * d_out + 2 * T * d_in + A.numel() + B.numel() + T * E) * es
    k_eff = E if gating == "dense" else int(gating[3:])  # experts a token really uses
    fwd_flops = 2 * T * k_eff * r * (d_in + d_out)
    shape = dict(T=T, d_in=d_in, d_out=d_out, E=E, r=r, gating=gating, dtype=dtype_name,
                 routed_pays=gating != "dense" and routed_pays(E, r, k_eff, d_in, d_out, es))
    gates_full = dense if gating == "dense" else dense_gates(E, kw["topk_idx"], kw["topk_weight"])
    with torch.no_grad():
        ref = loramoe_delta_torch(x.float(), A.float(), B.float(), gates_full.float(), scale=2.0)
        low_err = _max_err(loramoe_delta_torch(x, A, B, gates_full, scale=2.0), ref)
    fns = {("torch_loop", "e2e"): lambda: loramoe_delta_loop(x, A, B, gates_full, scale=2.0)}
    for b in backends:
        fns[(b, "e2e")] = (lambda b=b: loramoe_delta(x, A, B, scale=2.0, backend=b, **kw))
    # Top-K over a wide mixture: the routed kernels are measured too, whichever path routed_pays picks.
    routed_row = "triton" in backends and gating != "dense" and E * (1 << max(0, (r - 1).bit_length())) > 256
    if "triton" in backends:
        from moe_unlearn.kernels.loramoe_delta import loramoe_delta_forward
        from moe_unlearn.kernels.loramoe_routed import loramoe_delta_routed_triton

        fns[("triton", "kernel")] = lambda: loramoe_delta_forward(x, A, B, gates_full, 2.0, save_h=False)[0]
    if routed_row:
        fns[("triton_routed", "kernel")] = lambda: loramoe_delta_routed_triton(x, A, B, kw["topk_idx"],
                                                                               kw["topk_weight"], scale=2.0)
    times, fwd_rows = {}, []

    def measure_fwd(fn, name, kind):
        with torch.no_grad():
            got, t = checked_timing(fn, device, runs)
            err = _max_err(got, ref)
        times[(name, kind)] = t.median_ms
        return {**timing_dict(t), **_rate_fields(fwd_bytes, fwd_flops, t.median_ms, bandwidth, peak),
                "max_err": err, "torch_same_dtype_err": low_err,
                "ok": err <= 2 * low_err + 4e-3 * ref.abs().max().item()}

    for (name, kind), fn in fns.items():
        row = rows.run({"op": "loramoe_delta_fwd", "backend": name, "kind": kind, **shape},
                       lambda fn=fn, name=name, kind=kind: measure_fwd(fn, name, kind))
        if row is not None:
            fwd_rows.append(row)
    loop_t = times.get(("torch_loop", "e2e"))
    stacked_t = times.get(("torch", "e2e"), loop_t)
    for row in fwd_rows:
        if loop_t:
            row["speedup_vs_loop"] = loop_t / row["median_ms"]
        if stacked_t:
            row["speedup_vs_stacked_torch"] = stacked_t / row["median_ms"]
    rows.flush()
    if not with_backward:
        return
    dout = torch.randn(T, d_out, device=device, dtype=dtype)
    gate_key = "gates" if gating == "dense" else "topk_weight"

    def grads(name, dt, leaves_src):
        leaves = [t.to(dt).clone().requires_grad_() for t in leaves_src[:3]]
        gl = {k: (v.to(dt).clone().requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
        if name == "triton_routed":
            out = loramoe_delta_routed_triton(*leaves, gl["topk_idx"], gl["topk_weight"], scale=2.0)
        else:
            out = loramoe_delta(*leaves, scale=2.0, backend=name, **gl)
        return [out.detach(), *torch.autograd.grad(out, [*leaves, gl[gate_key]], dout.to(dt))]

    # The fp32 torch reference of every gradient and torch's own error in this dtype (the tolerance).
    ref_g = grads("torch", torch.float32, (x, A, B))
    low_g = grads("torch", dtype, (x, A, B))
    bwd_rows = []

    def measure_bwd(name):
        got, t = checked_timing(lambda: grads(name, dtype, (x, A, B)), device, max(min(3, runs), runs // 2))
        ok, worst = _grads_close(got, ref_g, low_g)
        return {**timing_dict(t), **_rate_fields(bwd_bytes, 3 * fwd_flops, t.median_ms, bandwidth, peak),
                "grads_checked": ["out", "dx", "dA", "dB", "d" + gate_key], "err_over_allowed": round(worst, 4),
                "ok": ok}

    for name in [b for b in backends if b != "cuda"] + (["triton_routed"] if routed_row else []):
        row = rows.run({"op": "loramoe_delta_fwd_bwd", "backend": name, "kind": "e2e", **shape},
                       lambda name=name: measure_bwd(name))
        if row is not None:
            bwd_rows.append(row)
    torch_bwd = [r_["median_ms"] for r_ in bwd_rows if r_["backend"] == "torch"]
    for row in bwd_rows:
        if torch_bwd:
            row["speedup_vs_stacked_torch"] = torch_bwd[0] / row["median_ms"]
    rows.flush()


def bench_routing(rows: Rows, shapes, device, backends, runs, bandwidth):
    for shape in shapes:
        _bench_routing_shape(rows, *shape, device, backends, runs, bandwidth)


def _bench_routing_shape(rows: Rows, T, E, K, S, dtype_name, device, backends, runs, bandwidth):
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(1)
    # Tie-free logits: the selection counts are compared exactly with the reference.
    logits = tie_free_logits(min(T, 1 << 16), E, g).to(device=device, dtype=dtype)
    logits = logits.repeat(triton_cdiv(T, logits.shape[0]), 1)[:T].contiguous()
    seq = torch.arange(T, device=device) * S // T  # sorted, equal-length sequences (int64, read as is)
    mask = torch.ones(T, dtype=torch.bool, device=device)
    nbytes = T * E * logits.element_size() + T * seq.element_size() + T * mask.element_size()
    shape = dict(T=T, E=E, K=K, sequences=S, dtype=dtype_name)
    ref = routing_stats_torch(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask)

    def baseline():  # what a user would write in plain torch for the selection counts alone
        p = torch.softmax(logits.float(), -1)
        return torch.bincount(torch.topk(p, K, dim=-1).indices.flatten(), minlength=E)

    fns = {("torch_softmax_topk_bincount", "e2e"): baseline}
    for b in [b for b in backends if b != "cuda"]:  # the CUDA extension has no routing_stats
        fns[(b, "e2e")] = lambda b=b: routing_stats(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask,
                                                    seq_sorted=True, backend=b)
    if "triton" in backends:
        from moe_unlearn.kernels.routing_stats import routing_stats_triton

        fns[("triton", "kernel")] = lambda: routing_stats_triton(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask,
                                                                 seq_sorted=True)
    base = {}

    def measure(name, fn):
        out, t = checked_timing(fn, device, runs)
        if name == "torch_softmax_topk_bincount":
            ok = torch.equal(out, ref.select_count)
        else:
            ok = torch.equal(out.select_count, ref.select_count) and bool(
                torch.allclose(out.gate_sum, ref.gate_sum, rtol=1e-4, atol=1e-3))
        base.setdefault("ms", t.median_ms)
        s = t.median_ms * 1e-3
        return {**timing_dict(t), "bytes": nbytes, "gbs": nbytes / s / 1e9,
                "bw_fraction": nbytes / s / 1e9 / bandwidth,
                "speedup_vs_softmax_topk_bincount": base["ms"] / t.median_ms, "ok": bool(ok)}

    for (name, kind), fn in fns.items():
        rows.run({"op": "routing_stats", "backend": name, "kind": kind, **shape},
                 lambda name=name, fn=fn: measure(name, fn))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(tiny: bool, cpu: bool = False) -> list[str]:
    """The rows' shapes a run would measure (the same choice as main's)."""
    use_cuda = torch.cuda.is_available() and not (cpu or tiny)
    lora = GPU_LORA_SHAPES if use_cuda else TINY_LORA_SHAPES if tiny else CPU_LORA_SHAPES
    routing = GPU_ROUTING_SHAPES if use_cuda else TINY_ROUTING_SHAPES if tiny else CPU_ROUTING_SHAPES
    lines_l = [f"loramoe_delta T={s[0]} d_in={s[1]} d_out={s[2]} E={s[3]} r={s[4]} {s[5]} (fwd, fwd+bwd)" for s in lora]
    lines_r = [f"routing_stats T={s[0]} E={s[1]} K={s[2]} S={s[3]} {s[4]}" for s in routing]
    return lines_l[:1] + lines_r[:1] + lines_l[1:] + lines_r[1:]  # the order main runs them


def table(path: Path) -> str:
    """The README's performance table (markdown) from a bench_ops.py results file."""
    payload = json.loads(Path(path).read_text())
    env = payload["environment"]
    lines = [f"{env['device']}, torch {env['torch']}, Triton {env['triton']}; copy bandwidth "
             f"{payload['copy_bandwidth_gbs']:.0f} GB/s"
             + ("; L2 flushed before each run." if env.get("device_type") == "cuda" else "."), "",
             "| op | shape | backend | kind | median ms | GB/s | of copy bandwidth | vs torch | ok |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in payload["results"]:
        if r.get("ok") is None:
            continue
        if r["op"].startswith("loramoe"):
            shape = f"T={r['T']} d={r['d_in']}x{r['d_out']} E={r['E']} r={r['r']} {r['gating']} {r['dtype']}"
            vs = r.get("speedup_vs_stacked_torch")
        else:
            shape = f"T={r['T']} E={r['E']} K={r['K']} {r['dtype']}"
            vs = r.get("speedup_vs_softmax_topk_bincount")
        ms = r.get("median_ms")
        lines.append(f"| {r['op']} | {shape} | {r['backend']} | {r['kind']} | "
                     f"{'' if ms is None else f'{ms:.3f}'} | {r.get('gbs', 0):.0f} | {r.get('bw_fraction', 0):.0%} | "
                     f"{'' if vs is None else f'{vs:.2f}x'} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="small torch-only shapes on the CPU")
    mode.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, Triton through the interpreter")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ops_<device>_<date>.json)")
    p.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    p.add_argument("--plan", action="store_true", help="print the shapes it would run and exit")
    p.add_argument("--table", type=Path, default=None, help="print the markdown table of a results file and exit")
    args = p.parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    if args.plan:
        for line in plan(args.tiny, args.cpu):
            print(f"bench {line}")
        return 0

    use_cuda = torch.cuda.is_available() and not (args.cpu or args.tiny)
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype_name = args.dtype or ("bf16" if use_cuda else "fp32")
    runs = args.runs or (50 if use_cuda else 1 if args.tiny else 10)
    backends = ["torch"]
    if triton_importable() and ((use_cuda and not triton_interpreting()) or (args.tiny and triton_interpreting())):
        backends.append("triton")
    if use_cuda and cuda_extension() is not None:
        backends.append("cuda")

    budget = Budget(args.budget_s)
    bandwidth = copy_bandwidth_gbs(device, None if not args.tiny else 8 << 20)
    peak = matmul_tflops(device, DTYPES[dtype_name], None if not args.tiny else 128)
    lora_shapes = GPU_LORA_SHAPES if use_cuda else TINY_LORA_SHAPES if args.tiny else CPU_LORA_SHAPES
    routing_shapes = GPU_ROUTING_SHAPES if use_cuda else TINY_ROUTING_SHAPES if args.tiny else CPU_ROUTING_SHAPES
    env = environment(device)
    note = ""
    if not use_cuda:
        note = ("CPU run: Triton rows are the interpreter (tiny shapes, correctness and plumbing only, not speed)"
                if args.tiny else "CPU run: torch paths only (Triton on the CPU is the interpreter)")
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
        args.out = Path(__file__).resolve().parent / "results" / f"ops_{slug}_{_dt.date.today().isoformat()}.json"
    log = RowLog(args.out, {"environment": env, "copy_bandwidth_gbs": bandwidth, "matmul_tflops": peak,
                            "backends": backends, "budget_s": args.budget_s, "note": note})
    rows = Rows(log, budget)
    # The goal shapes of both ops first, so a run cut short by its budget has measured them.
    bench_lora(rows, lora_shapes[:1], dtype_name, device, backends, runs, bandwidth, peak)
    bench_routing(rows, routing_shapes[:1], device, backends, runs, bandwidth)
    bench_lora(rows, lora_shapes[1:], dtype_name, device, backends, runs, bandwidth, peak)
    bench_routing(rows, routing_shapes[1:], device, backends, runs, bandwidth)
    done = [r for r in rows.list if r.get("ok") is not None]
    log.update(all_ok=all(r["ok"] for r in done), skipped=len(rows.list) - len(done),
               triton_compiles=compiled_variants(), complete=True)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s, matmul {peak:.1f} TFLOP/s on {env['device']}")
    for r in rows.list:
        if r.get("ok") is None:
            print(f"{r['op']:<22} {r['backend']:<28} {r['kind']:<6} skipped ({r.get('skipped')})")
            continue
        extra = "".join(f" {k}={r[k]:.2f}" for k in ("gbs", "bw_fraction", "flop_fraction", "speedup_vs_loop",
                                                       "speedup_vs_stacked_torch", "speedup_vs_softmax_topk_bincount")
                        if k in r)
        print(f"{r['op']:<22} {r['backend']:<28} {r['kind']:<6} {r.get('T')}x{r.get('d_in', r.get('E'))} "
              f"{r.get('gating', '')} {r.get('median_ms', float('nan')):.3f} ms{extra} ok={r['ok']} "
              f"{r.get('error', '')}")
    print(f"wrote {args.out}")
    return 0 if log.payload["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
