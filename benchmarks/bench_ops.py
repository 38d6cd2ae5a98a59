"""Microbenchmarks of the ops per backend and shape (issue 6 goals on an H100, bf16):
LoRAMoE forward at T=16384, d=4096, E=8, r=16: >= 5x the per-expert loop, >= 1.5x stacked torch,
>= 70% of the measured copy bandwidth; routing_stats at T=1M, E=64: >= 80% of bandwidth.

    python benchmarks/bench_ops.py            # CUDA device: every available backend, goal shapes
    python benchmarks/bench_ops.py --cpu      # small torch-only shapes on the CPU (Triton there is an interpreter)

Writes benchmarks/results/ops_<device>_<date>.json. Bytes are the minimum traffic of the op (inputs
read once, outputs written once); GB/s = bytes / median time; bw_fraction = GB/s / copy GB/s.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import copy_bandwidth_gbs, environment, time_fn, timing_dict, write_json  # noqa: E402

from moe_unlearn.ops import loramoe_delta, loramoe_delta_loop, routing_stats  # noqa: E402
from moe_unlearn.ops.dispatch import cuda_extension, triton_importable  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

GPU_LORA_SHAPES = [  # T, d_in, d_out, E, r, gating (dense | top-K)
    (16384, 4096, 4096, 8, 16, "dense"),  # the goal shape
    (16384, 4096, 4096, 8, 16, "top2"),
    (16384, 4096, 4096, 6, 4, "dense"),  # the LoRAMoE paper's E=6, r=4
    (16384, 4096, 4096, 64, 16, "top4"),
    (4096, 2048, 5632, 8, 64, "dense"),
]
CPU_LORA_SHAPES = [(2048, 512, 512, 8, 16, "dense"), (2048, 512, 512, 6, 4, "top2")]
GPU_ROUTING_SHAPES = [(1 << 20, 64, 8, 1024), (1 << 20, 128, 8, 1024), (1 << 18, 8, 2, 256)]  # T, E, K, sequences
CPU_ROUTING_SHAPES = [(1 << 16, 64, 8, 64), (1 << 16, 8, 2, 64)]


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


def bench_lora(shapes, dtype_name, device, backends, runs, with_backward):
    rows = []
    for shape in shapes:
        rows += _bench_lora_shape(*shape, dtype_name, device, backends, runs, with_backward)
    return rows


def _bench_lora_shape(T, d_in, d_out, E, r, gating, dtype_name, device, backends, runs, with_backward):
    dtype = DTYPES[dtype_name]
    rows = []
    x, A, B, dense, kw = lora_inputs(T, d_in, d_out, E, r, gating, dtype, device)
    esize = x.element_size()
    nbytes = (T * d_in + T * d_out + A.numel() + B.numel()) * esize + T * E * esize
    shape = dict(T=T, d_in=d_in, d_out=d_out, E=E, r=r, gating=gating, dtype=dtype_name)
    fns = {"torch_loop": lambda: loramoe_delta_loop(x, A, B, dense, scale=2.0)}
    for b in backends:
        fns[b] = (lambda b=b: loramoe_delta(x, A, B, scale=2.0, backend=b, **kw))
    times = {}
    with torch.no_grad():
        for name, fn in fns.items():
            t = time_fn(fn, device, runs=runs)
            times[name] = t
            rows.append({"op": "loramoe_delta_fwd", "backend": name, **shape, **timing_dict(t),
                         "bytes": nbytes, "gbs": nbytes / (t.median_ms * 1e-3) / 1e9})
    if with_backward:
        dout = torch.randn(T, d_out, device=device, dtype=dtype)
        for name in [b for b in backends if b != "cuda"]:
            leaves = [t.clone().requires_grad_() for t in (x, A, B)]
            gl = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}

            def step(name=name, leaves=leaves, gl=gl):
                out = loramoe_delta(*leaves, scale=2.0, backend=name, **gl)
                torch.autograd.grad(out, [*leaves, *[v for v in gl.values() if v.requires_grad]], dout)

            t = time_fn(step, device, runs=max(5, runs // 2))
            rows.append({"op": "loramoe_delta_fwd_bwd", "backend": name, **shape, **timing_dict(t)})
    loop_t, stacked_t = times["torch_loop"].median_ms, times.get("torch", times["torch_loop"]).median_ms
    for row in rows:
        if row["op"] == "loramoe_delta_fwd" and all(row[k] == v for k, v in shape.items()):
            row["speedup_vs_loop"] = loop_t / row["median_ms"]
            row["speedup_vs_stacked_torch"] = stacked_t / row["median_ms"]
    return rows


def bench_routing(shapes, dtype_name, device, backends, runs):
    rows = []
    for shape in shapes:
        rows += _bench_routing_shape(*shape, dtype_name, device, backends, runs)
    return rows


def _bench_routing_shape(T, E, K, S, dtype_name, device, backends, runs):
    dtype = DTYPES[dtype_name]
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(T, E, device=device, generator=g).to(dtype)
    seq = torch.arange(T, device=device) * S // T  # sorted, equal-length sequences
    mask = torch.ones(T, dtype=torch.bool, device=device)
    nbytes = T * E * logits.element_size() + T * seq.element_size() + T
    shape = dict(T=T, E=E, K=K, sequences=S, dtype=dtype_name)
    base = None
    for b in backends:
        t = time_fn(lambda b=b: routing_stats(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask, backend=b),
                    device, runs=runs)
        base = base or t.median_ms
        rows.append({"op": "routing_stats", "backend": b, **shape, **timing_dict(t), "bytes": nbytes,
                     "gbs": nbytes / (t.median_ms * 1e-3) / 1e9, "speedup_vs_torch": base / t.median_ms})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="small torch-only shapes on the CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ops_<device>_<date>.json)")
    args = p.parse_args(argv)

    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype_name = args.dtype or ("bf16" if use_cuda else "fp32")
    runs = args.runs or (50 if use_cuda else 10)
    backends = ["torch"]
    if use_cuda and triton_importable():
        backends.append("triton")
    if use_cuda and cuda_extension() is not None:
        backends.append("cuda")

    bandwidth = copy_bandwidth_gbs(device)
    rows = bench_lora(GPU_LORA_SHAPES if use_cuda else CPU_LORA_SHAPES, dtype_name, device, backends, runs,
                      with_backward=True)
    rows += bench_routing(GPU_ROUTING_SHAPES if use_cuda else CPU_ROUTING_SHAPES, dtype_name, device, backends, runs)
    for row in rows:
        if "gbs" in row:
            row["bw_fraction"] = row["gbs"] / bandwidth
    env = environment(device)
    payload = {"environment": env, "copy_bandwidth_gbs": bandwidth, "backends": backends, "results": rows,
               "note": "CPU run: torch paths only (Triton on the CPU is the interpreter)" if not use_cuda else ""}
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
        args.out = Path(__file__).resolve().parent / "results" / f"ops_{slug}_{_dt.date.today().isoformat()}.json"
    write_json(args.out, payload)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s on {env['device']}")
    for r in rows:
        extra = "".join(f" {k}={r[k]:.2f}" for k in ("gbs", "bw_fraction", "speedup_vs_loop", "speedup_vs_stacked_torch")
                        if k in r)
        print(f"{r['op']:<22} {r['backend']:<10} {r.get('T')}x{r.get('d_in', r.get('E'))} "
              f"{r.get('gating', '')} {r['median_ms']:.3f} ms{extra}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
