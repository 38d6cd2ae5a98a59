"""Compile every Triton kernel for sm_90 (Hopper) as the JIT would at the goal shapes, without a GPU, and
report per kernel: registers, local memory (spills), shared memory, blocks per SM and, from the SASS, the
instructions of every loop (loads, cp.async, MMA, shuffles, barriers).

    TRITON_INTERPRET unset:  python benchmarks/compile_sm90.py [--quick] [--out kernels_sm90.json]

How it matches the JIT: the real launchers run on CPU tensors of the goal shapes with their launches
recorded instead of executed (the autotuned forward records each of its configurations), and each recorded
launch is specialised by Triton's own binder for an sm_90 target, exactly as `kernel[grid](...)` does on a
GPU: integer arguments equal to 1 become constants, multiples of 16 (and 16-byte aligned pointers) are
marked divisible. One compile per distinct specialisation. Launch decisions that read the SM count see 132
(H100 SXM). Triton's version matters (the lent GPU machine runs 3.6; the script works with 3.6 and 3.9);
the JSON records it.

Ops compiled (shapes of benchmarks/bench_ops.py): dense LoRAMoE forward+backward at T=16384, d=4096, E=8,
r=16 (fused) and at T=4096, d=2048x5632, E=8, r=64 (unfused) and r=256 (rank chunks); routed top-4 of 64
experts at d=4096, r=16; routing_stats at E=64, top-4 and top-8, bf16 and fp32 logits. Exit status 1 when
a kernel fails to compile or exceeds sm_90's 232,448 B of shared memory per block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_sm90.py compiles kernels: run it with TRITON_INTERPRET unset")

import moe_unlearn.kernels._common as kc  # noqa: E402
import moe_unlearn.kernels.loramoe_delta as ld  # noqa: E402
import moe_unlearn.kernels.loramoe_routed as lr  # noqa: E402
import moe_unlearn.kernels.routing_stats as rs  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

SM90 = {"smem_per_block": 232448, "smem_per_sm": 233472, "smem_reserved_per_block": 1024, "regs_per_sm": 65536,
        "max_warps": 64, "max_blocks": 32, "sms": 132}
TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# ---------------------------------------------------------------------------------------------- capture

@contextlib.contextmanager
def recorded_launches(calls: list):
    """Run launchers with every Triton launch recorded (fn, args, kwargs) instead of executed."""

    def jit_run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    def tuner_run(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        for cfg in self.configs:
            calls.append((self.fn, args, {**kwargs, **cfg.all_kwargs()}))

    saved = (JITFunction.run, Autotuner.run, kc.check_launchable, ld.check_launchable, lr.check_launchable,
             rs.check_launchable, kc.sm_count, ld.sm_count, rs.sm_count)
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    ld.check_launchable = lr.check_launchable = rs.check_launchable = kc.check_launchable = lambda t: None
    kc.sm_count = ld.sm_count = rs.sm_count = lambda device: SM90["sms"]
    try:
        yield
    finally:
        (JITFunction.run, Autotuner.run, kc.check_launchable, ld.check_launchable, lr.check_launchable,
         rs.check_launchable, kc.sm_count, ld.sm_count, rs.sm_count) = saved


def _dense(T, d_in, d_out, E, r):
    def run():
        x = torch.empty(T, d_in, dtype=torch.bfloat16).requires_grad_()
        A = torch.empty(E, r, d_in, dtype=torch.bfloat16).requires_grad_()
        B = torch.empty(E, d_out, r, dtype=torch.bfloat16).requires_grad_()
        g = torch.empty(T, E, dtype=torch.bfloat16).requires_grad_()
        out = ld.loramoe_delta_triton(x, A, B, g, scale=2.0)
        torch.autograd.grad(out, [x, A, B, g], torch.empty(T, d_out, dtype=torch.bfloat16))
    return run


def _routed(T, d_in, d_out, E, r, K):
    def run():
        x = torch.empty(T, d_in, dtype=torch.bfloat16).requires_grad_()
        A = torch.empty(E, r, d_in, dtype=torch.bfloat16).requires_grad_()
        B = torch.empty(E, d_out, r, dtype=torch.bfloat16).requires_grad_()
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(64)]).repeat(T // 64, 1)
        w = torch.empty(T, K, dtype=torch.bfloat16).requires_grad_()
        out = lr.loramoe_delta_routed_triton(x, A, B, idx, w, scale=2.0)
        torch.autograd.grad(out, [x, A, B, w], torch.empty(T, d_out, dtype=torch.bfloat16))
    return run


def _routing(T, E, K, dtype):
    def run():
        rs.routing_stats_triton(torch.empty(T, E, dtype=dtype), top_k=K, seq_ids=torch.arange(T) * 1024 // T,
                                num_seqs=1024, mask=torch.ones(T, dtype=torch.bool), seq_sorted=True)
    return run


def ops(quick: bool) -> dict:
    """op name -> a function that runs its launchers once. The routed op captures at T=4096: the
    specialisation depends on divisibility, not size, and the torch glue on the CPU is then cheap."""
    out = {"dense_fwd_bwd_T16384_d4096_E8_r16_bf16": _dense(16384, 4096, 4096, 8, 16),
           "routed_fwd_bwd_d4096_E64_r16_top4_bf16": _routed(4096, 4096, 4096, 64, 16, 4),
           "routing_T1M_E64_top8_bf16": _routing(1 << 20, 64, 8, torch.bfloat16)}
    if not quick:
        out.update({"dense_fwd_bwd_T4096_d2048x5632_E8_r64_bf16": _dense(4096, 2048, 5632, 8, 64),
                    "dense_fwd_bwd_T4096_d1024_E2_r256_bf16": _dense(4096, 1024, 1024, 2, 256),
                    "routing_T1M_E64_top4_bf16": _routing(1 << 20, 64, 4, torch.bfloat16),
                    "routing_T1M_E64_top8_fp32": _routing(1 << 20, 64, 8, torch.float32),
                    "routing_T1M_E64_top4_fp32": _routing(1 << 20, 64, 4, torch.float32)})
    return out


# ---------------------------------------------------------------------------------------------- compile

def specialise(fn: JITFunction, args: tuple, kwargs: dict):
    """Triton's own launch-time specialisation for sm_90: (options, signature, constexprs, attrs)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, spec, opts)


def _run(tool: str, *args: str) -> str:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=300, check=True).stdout


OPCLASSES = {  # SASS opcode prefix -> what it is
    "LDG": "ldg", "LDGSTS": "cp_async", "UTMALDG": "tma_load", "LDS": "lds", "LDSM": "ldsm", "STS": "sts",
    "STG": "stg", "HMMA": "mma", "HGMMA": "wgmma", "IMMA": "mma", "FFMA": "ffma", "SHFL": "shfl", "BAR": "bar",
    "WARPSYNC": "bar", "LDL": "local_load", "STL": "local_store", "MUFU": "mufu", "REDUX": "redux",
}


def sass_loops(cubin: bytes) -> tuple[int, list[dict]]:
    """(instructions, loops) of a cubin's SASS: a loop is a backward branch; its body the instructions from
    the target label to the branch (nested loops are listed on their own and counted in their parents)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = _run("nvdisasm", "-c", str(path))
    instrs, labels = [], {}
    for line in text.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            instrs.append(m.group(2))
    loops = []
    for i, ins in enumerate(instrs):
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", ins)
        if m and labels.get(m.group(1), i + 1) < i:  # backward branch, not the trailing self-loop trap
            body = instrs[labels[m.group(1)]: i + 1]
            counts: dict[str, int] = {}
            for b in body:
                op = re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0]
                cls = OPCLASSES.get(op)
                if cls:
                    counts[cls] = counts.get(cls, 0) + 1
            loops.append({"instructions": len(body), **dict(sorted(counts.items()))})
    real = [lp for lp in loops if lp["instructions"] > 1]
    return len(instrs), sorted(real, key=lambda lp: -lp["instructions"])


def blocks_per_sm(regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM on sm_90 and what limits them."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {"registers": SM90["regs_per_sm"] // (regs_per_warp * num_warps),
              "shared_memory": SM90["smem_per_sm"] // (shared + SM90["smem_reserved_per_block"]),
              "warps": SM90["max_warps"] // num_warps, "blocks": SM90["max_blocks"]}
    which = min(limits, key=limits.get)
    return limits[which], which


def compile_variant(fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    options, signature, constexprs, attrs = specialise(fn, args, kwargs)
    names = list(fn.arg_names)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(k.asm["cubin"])
        usage = _run("cuobjdump", "-res-usage", str(path))
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    regs, local, static_smem = int(res.get("REG", 0)), int(res.get("LOCAL", 0)), int(res.get("SHARED", 0))
    shared = int(k.metadata.shared) + static_smem
    n_ins, loops = sass_loops(k.asm["cubin"])
    nb, limiter = blocks_per_sm(regs, shared, options.num_warps)
    ints = [names[p[0]] for p, v in constexprs.items() if len(p) == 1 and fn.params[p[0]].is_constexpr is False]
    aligned = [names[p[0]] for p, a in attrs.items() if len(p) == 1 and any("divisibility" in str(x) for x in a)]
    consts = {names[p[0]]: str(v) for p, v in constexprs.items() if len(p) == 1 and fn.params[p[0]].is_constexpr}
    row = {"kernel": fn.fn.__name__, "num_warps": options.num_warps, "num_stages": options.num_stages,
           "constexprs": consts, "ints_specialised_to_constants": ints, "marked_divisible_by_16": aligned,
           "registers": regs, "local_bytes_spills": local, "shared_bytes": shared, "blocks_per_sm": nb,
           "occupancy_limiter": limiter, "sass_instructions": n_ins, "loops": loops[:6],
           "ok": shared <= SM90["smem_per_block"]}
    return row


def _key(fn, args, kwargs) -> str:
    options, signature, constexprs, attrs = specialise(fn, args, kwargs)
    return repr((fn.fn.__name__, sorted(signature.items()), sorted((k, str(v)) for k, v in constexprs.items()),
                 sorted((k, str(v)) for k, v in attrs.items()), options.num_warps, options.num_stages))


def routing_per_token(row: dict) -> float | None:
    """Warp instructions per token of the routing pass: its tile loop (the largest loop) runs once per tile
    on each of num_warps warps and covers BLOCK_T tokens (one sequence per tile; more add the inner loop)."""
    bt = int(row["constexprs"].get("BLOCK_T", 0) or 0)
    if not row["loops"] or not bt:
        return None
    return round(row["loops"][0]["instructions"] * row["num_warps"] / bt, 1)


HBM_BYTES_PER_S, BF16_FLOPS = 3.35e12, 989e12  # H100 SXM


def traffic() -> dict:
    """Byte model of the routed design at its goal shape (T=16384, d=4096, E=64, r=16, top-4, bf16) next to
    the minimum (read x once, write the delta once; + dout read, x re-read, dx written for the backward)
    and the dense formulation routed_pays compares it with: terms in MB, ceilings as a fraction of the
    memory roofline (minimum bytes over the larger of moved bytes / HBM and FLOPs / tensor-core peak)."""
    T, d, E, r, K, es = 16384, 4096, 64, 16, 4, 2
    mb = 1e-6
    tok = T * d * es  # one [T, d] tensor in bf16
    pair = K * tok  # one [T, K, d] gather or intermediate
    small = (2 * E * r * d * es + 2 * T * K * r * 4)  # A and B once, h (fp32) written and read
    fwd = {"x gathered per pair": pair, "y_p written (bf16)": pair, "y_p read by the K-sum": pair,
           "delta written": tok, "A, B, h": small}
    bwd = {"dout gathered per pair (g)": pair, "dx_p written (bf16)": pair, "dx_p read by the K-sum": pair,
           "dx written": tok, "x gathered again (dA)": pair, "dout gathered again (dB)": pair, "A, B, g": small}
    min_fwd, min_fwd_bwd = 2 * tok + small, 5 * tok + 2 * small
    dense_flops = 2 * T * E * r * (2 * d)

    def ceiling(min_b, moved_b, flops=0.0):
        return round(min_b / HBM_BYTES_PER_S / max(moved_b / HBM_BYTES_PER_S, flops / BF16_FLOPS), 3)

    moved_f, moved_fb = sum(fwd.values()), sum(fwd.values()) + sum(bwd.values())
    return {"shape": "T=16384 d_in=d_out=4096 E=64 r=16 top-4 bf16",
            "routed_forward_MB": {k: round(v * mb, 1) for k, v in fwd.items()},
            "routed_backward_MB": {k: round(v * mb, 1) for k, v in bwd.items()},
            "minimum_MB": {"forward": round(min_fwd * mb, 1), "forward_backward": round(min_fwd_bwd * mb, 1)},
            "routed_moved_MB": {"forward": round(moved_f * mb, 1), "forward_backward": round(moved_fb * mb, 1)},
            "routed_ceiling": {"forward": ceiling(min_fwd, moved_f), "forward_backward": ceiling(min_fwd_bwd, moved_fb)},
            "dense_gemm_GFLOP": {"forward": round(dense_flops * 1e-9, 1), "forward_backward": round(3 * dense_flops * 1e-9, 1)},
            "dense_ceiling": {"forward": ceiling(min_fwd, 2 * tok, dense_flops),
                              "forward_backward": ceiling(min_fwd_bwd, 5 * tok, 3 * dense_flops)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the three headline ops only")
    p.add_argument("--out", type=Path)
    p.add_argument("--only", default="", help="ops whose name contains this (e.g. routing)")
    args = p.parse_args(argv)
    variants: dict[str, dict] = {}
    op_rows = {}
    for op, run in ops(args.quick).items():
        if args.only not in op:
            continue
        calls: list = []
        with recorded_launches(calls):
            run()
        keys = []
        for fn, a, kw in calls:
            try:
                key = _key(fn, a, kw)
                if key not in variants:
                    variants[key] = compile_variant(fn, a, kw)
                    variants[key]["ops"] = []
            except Exception as exc:  # a kernel that does not compile is a failed row
                key = f"{fn.fn.__name__}:{exc!r}"[:300]
                variants.setdefault(key, {"kernel": fn.fn.__name__, "ok": False, "ops": [],
                                          "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            if op not in variants[key]["ops"]:
                variants[key]["ops"].append(op)
            keys.append(key)
        op_rows[op] = {"triton_launches": len(calls), "kernels": [variants[k]["kernel"] for k in dict.fromkeys(keys)]}
        for key in dict.fromkeys(keys):
            r = variants[key]
            if r["kernel"] == "_routing_stats_kernel" and r.get("loops"):
                r["warp_instructions_per_token"] = routing_per_token(r)
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {op:<44} {r['kernel']:<22} w={r.get('num_warps')} "
                  f"regs={r.get('registers')} local={r.get('local_bytes_spills')} smem={r.get('shared_bytes')} "
                  f"blocks/SM={r.get('blocks_per_sm')} loop={[lp['instructions'] for lp in r.get('loops', [])][:3]} "
                  f"{r.get('error', '')}", flush=True)
    payload = {"triton": triton.__version__, "torch": torch.__version__, "target": "cuda sm_90 (H100: 132 SMs)",
               "limits": SM90, "traffic_routed_goal_shape": traffic(), "ops": op_rows, "kernels": list(variants.values())}
    if args.out:
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0 if all(r["ok"] for r in variants.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
