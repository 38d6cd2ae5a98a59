"""Microbenchmarks of the ops per backend and shape. Goals on an H100, bf16:
loramoe_delta forward at T=16384, d=4096, E=8, r=16: >= 70% of the measured copy bandwidth (floor: one
read of x, one write of the delta), >= 1.5x the stacked two-GEMM torch form, >= 5x the per-expert loop;
forward + backward >= 50%; routing_stats at T=1M, E=64, K=8: >= 80% of bandwidth and >= 5x a plain torch
softmax + topk + bincount.

    python benchmarks/bench_ops.py            # CUDA device: every available backend, goal shapes
    python benchmarks/bench_ops.py --cpu      # small torch-only shapes on the CPU
    python benchmarks/bench_ops.py --tiny     # tiny shapes, Triton through the interpreter (the CI dry run)

Writes benchmarks/results/ops_<device>_<date>.json. Every row has: median/p20/p80 ms with the L2 cache
flushed before each run (GPU), `bytes` = the minimum traffic of the op (inputs read once, outputs written
once), `gbs` and `bw_fraction` (of the measured copy bandwidth), `flops`, `tflops` and `flop_fraction` (of
a measured large bf16/fp16/fp32 matmul), and `max_err` / `ok` against the fp32 torch reference.
`kernel` rows call the Triton launcher directly (no validation, no dispatch); `e2e` rows the public op.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_ms, copy_bandwidth_gbs, environment, matmul_tflops, timing_dict, write_json  # noqa: E402

from moe_unlearn.ops import (  # noqa: E402
    dense_gates,
    loramoe_delta,
    loramoe_delta_loop,
    loramoe_delta_torch,
    routing_stats,
    routing_stats_torch,
)
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
TINY_LORA_SHAPES = [(48, 24, 16, 6, 4, "top2")]
GPU_ROUTING_SHAPES = [(1 << 20, 64, 8, 1024), (1 << 20, 128, 8, 1024), (1 << 18, 8, 2, 256)]  # T, E, K, sequences
CPU_ROUTING_SHAPES = [(1 << 16, 64, 8, 64), (1 << 16, 8, 2, 64)]
TINY_ROUTING_SHAPES = [(100, 64, 8, 4)]


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


def _max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.float() - ref).abs().max().item() if got.numel() else 0.0


def _rate_fields(nbytes: float, flops: float, ms: float, bandwidth: float, peak_tflops: float) -> dict:
    s = ms * 1e-3
    return {"bytes": int(nbytes), "gbs": nbytes / s / 1e9, "bw_fraction": nbytes / s / 1e9 / bandwidth,
            "flops": int(flops), "tflops": flops / s / 1e12, "flop_fraction": flops / s / 1e12 / peak_tflops}


def bench_lora(shapes, dtype_name, device, backends, runs, bandwidth, peak, with_backward=True):
    rows = []
    for shape in shapes:
        rows += _bench_lora_shape(*shape, dtype_name, device, backends, runs, bandwidth, peak, with_backward)
    return rows


def _bench_lora_shape(T, d_in, d_out, E, r, gating, dtype_name, device, backends, runs, bandwidth, peak,
                      with_backward):
    dtype = DTYPES[dtype_name]
    rows = []
    x, A, B, dense, kw = lora_inputs(T, d_in, d_out, E, r, gating, dtype, device)
    es = x.element_size()
    # Minimum traffic: x read once, delta written once, A, B and the gates read once.
    fwd_bytes = (T * d_in + T * d_out + A.numel() + B.numel() + T * E) * es
    # + backward: dout read, x read again, dx written (dA, dB, dgates are small).
    bwd_bytes = fwd_bytes + (T * d_out + 2 * T * d_in + A.numel() + B.numel() + T * E) * es
    k_eff = E if gating == "dense" else int(gating[3:])  # experts a token really uses
    fwd_flops = 2 * T * k_eff * r * (d_in + d_out)
    shape = dict(T=T, d_in=d_in, d_out=d_out, E=E, r=r, gating=gating, dtype=dtype_name)
    gates_full = dense if gating == "dense" else dense_gates(E, kw["topk_idx"], kw["topk_weight"])
    with torch.no_grad():
        ref = loramoe_delta_torch(x.float(), A.float(), B.float(), gates_full.float(), scale=2.0)
        low_err = _max_err(loramoe_delta_torch(x, A, B, gates_full, scale=2.0), ref)
    fns = {("torch_loop", "e2e"): lambda: loramoe_delta_loop(x, A, B, gates_full, scale=2.0)}
    for b in backends:
        fns[(b, "e2e")] = (lambda b=b: loramoe_delta(x, A, B, scale=2.0, backend=b, **kw))
    if "triton" in backends:
        from moe_unlearn.kernels.loramoe_delta import loramoe_delta_forward

        fns[("triton", "kernel")] = lambda: loramoe_delta_forward(x, A, B, gates_full, 2.0, save_h=False)[0]
    times = {}
    with torch.no_grad():
        for (name, kind), fn in fns.items():
            err = _max_err(fn(), ref)
            t = bench_ms(fn, device, runs=runs)
            times[(name, kind)] = t.median_ms
            rows.append({"op": "loramoe_delta_fwd", "backend": name, "kind": kind, **shape, **timing_dict(t),
                         **_rate_fields(fwd_bytes, fwd_flops, t.median_ms, bandwidth, peak),
                         "max_err": err, "torch_same_dtype_err": low_err,
                         "ok": err <= 2 * low_err + 4e-3 * ref.abs().max().item()})
    loop_t, stacked_t = times[("torch_loop", "e2e")], times.get(("torch", "e2e"), times[("torch_loop", "e2e")])
    for row in rows:
        row["speedup_vs_loop"] = loop_t / row["median_ms"]
        row["speedup_vs_stacked_torch"] = stacked_t / row["median_ms"]
    if with_backward:
        dout = torch.randn(T, d_out, device=device, dtype=dtype)
        for name in [b for b in backends if b != "cuda"]:
            leaves = [t.clone().requires_grad_() for t in (x, A, B)]
            gl = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
            wanted = [*leaves, *[v for v in gl.values() if v.requires_grad]]

            def step(name=name, leaves=leaves, gl=gl, wanted=wanted):
                out = loramoe_delta(*leaves, scale=2.0, backend=name, **gl)
                return torch.autograd.grad(out, wanted, dout)

            got = step()
            t = bench_ms(step, device, runs=max(3, runs // 2))
            rows.append({"op": "loramoe_delta_fwd_bwd", "backend": name, "kind": "e2e", **shape, **timing_dict(t),
                         **_rate_fields(bwd_bytes, 3 * fwd_flops, t.median_ms, bandwidth, peak),
                         "ok": all(bool(torch.isfinite(g.float()).all()) for g in got)})
        torch_bwd = [r_["median_ms"] for r_ in rows if r_["op"] == "loramoe_delta_fwd_bwd" and r_["backend"] == "torch"]
        for row in rows:
            if row["op"] == "loramoe_delta_fwd_bwd" and torch_bwd:
                row["speedup_vs_stacked_torch"] = torch_bwd[0] / row["median_ms"]
    return rows


def bench_routing(shapes, dtype_name, device, backends, runs, bandwidth):
    rows = []
    for shape in shapes:
        rows += _bench_routing_shape(*shape, dtype_name, device, backends, runs, bandwidth)
    return rows


def _bench_routing_shape(T, E, K, S, dtype_name, device, backends, runs, bandwidth):
    dtype = DTYPES[dtype_name]
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(T, E, device=device, generator=g).to(dtype)
    seq = torch.arange(T, device=device) * S // T  # sorted, equal-length sequences (int64, read as is)
    mask = torch.ones(T, dtype=torch.bool, device=device)
    nbytes = T * E * logits.element_size() + T * seq.element_size() + T * mask.element_size()
    shape = dict(T=T, E=E, K=K, sequences=S, dtype=dtype_name)
    ref = routing_stats_torch(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask)

    def baseline():  # what a user would write in plain torch for the selection counts alone
        p = torch.softmax(logits.float(), -1)
        return torch.bincount(torch.topk(p, K, dim=-1).indices.flatten(), minlength=E)

    fns = {("torch_softmax_topk_bincount", "e2e"): baseline}
    for b in backends:
        fns[(b, "e2e")] = lambda b=b: routing_stats(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask,
                                                    seq_sorted=True, backend=b)
    if "triton" in backends:
        from moe_unlearn.kernels.routing_stats import routing_stats_triton

        fns[("triton", "kernel")] = lambda: routing_stats_triton(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask,
                                                                 seq_sorted=True)
    base_ms = None
    for (name, kind), fn in fns.items():
        out = fn()
        if name == "torch_softmax_topk_bincount":
            ok = torch.equal(out, ref.select_count)
        else:
            ok = torch.equal(out.select_count, ref.select_count) and bool(
                torch.allclose(out.gate_sum, ref.gate_sum, rtol=1e-4, atol=1e-3))
        t = bench_ms(fn, device, runs=runs)
        base_ms = base_ms or t.median_ms
        s = t.median_ms * 1e-3
        rows.append({"op": "routing_stats", "backend": name, "kind": kind, **shape, **timing_dict(t),
                     "bytes": nbytes, "gbs": nbytes / s / 1e9, "bw_fraction": nbytes / s / 1e9 / bandwidth,
                     "speedup_vs_softmax_topk_bincount": base_ms / t.median_ms, "ok": bool(ok)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="small torch-only shapes on the CPU")
    mode.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, Triton through the interpreter")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ops_<device>_<date>.json)")
    args = p.parse_args(argv)

    use_cuda = torch.cuda.is_available() and not (args.cpu or args.tiny)
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype_name = args.dtype or ("bf16" if use_cuda else "fp32")
    runs = args.runs or (50 if use_cuda else 1 if args.tiny else 10)
    backends = ["torch"]
    if triton_importable() and ((use_cuda and not triton_interpreting()) or (args.tiny and triton_interpreting())):
        backends.append("triton")
    if use_cuda and cuda_extension() is not None:
        backends.append("cuda")

    bandwidth = copy_bandwidth_gbs(device, None if not args.tiny else 8 << 20)
    peak = matmul_tflops(device, DTYPES[dtype_name], None if not args.tiny else 128)
    lora_shapes = GPU_LORA_SHAPES if use_cuda else TINY_LORA_SHAPES if args.tiny else CPU_LORA_SHAPES
    routing_shapes = GPU_ROUTING_SHAPES if use_cuda else TINY_ROUTING_SHAPES if args.tiny else CPU_ROUTING_SHAPES
    rows = bench_lora(lora_shapes, dtype_name, device, backends, runs, bandwidth, peak)
    rows += bench_routing(routing_shapes, dtype_name, device, backends, runs, bandwidth)
    env = environment(device)
    note = ""
    if not use_cuda:
        note = ("CPU run: Triton rows are the interpreter (tiny shapes, correctness and plumbing only, not speed)"
                if args.tiny else "CPU run: torch paths only (Triton on the CPU is the interpreter)")
    payload = {"environment": env, "copy_bandwidth_gbs": bandwidth, "matmul_tflops": peak, "backends": backends,
               "results": rows, "all_ok": all(r["ok"] for r in rows), "note": note}
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
        args.out = Path(__file__).resolve().parent / "results" / f"ops_{slug}_{_dt.date.today().isoformat()}.json"
    write_json(args.out, payload)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s, matmul {peak:.1f} TFLOP/s on {env['device']}")
    for r in rows:
        extra = "".join(f" {k}={r[k]:.2f}" for k in ("gbs", "bw_fraction", "flop_fraction", "speedup_vs_loop",
                                                       "speedup_vs_stacked_torch", "speedup_vs_softmax_topk_bincount")
                        if k in r)
        print(f"{r['op']:<22} {r['backend']:<28} {r['kind']:<6} {r.get('T')}x{r.get('d_in', r.get('E'))} "
              f"{r.get('gating', '')} {r['median_ms']:.3f} ms{extra} ok={r['ok']}")
    print(f"wrote {args.out}")
    return 0 if payload["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
