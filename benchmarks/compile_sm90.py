"""Compile the Triton kernels for sm_90 (Hopper) on a machine without a GPU and report, per kernel and
launch configuration, shared memory, registers and spills (ptxas ships with the Triton wheel).

    TRITON_INTERPRET=0 python benchmarks/compile_sm90.py [--quick] [--out compile_sm90.json]

Checks that each configuration assembles and fits sm_90's 232,448 B of shared memory per block (exit
status 1 otherwise); register spills are reported (the fused forward spills 192-600 B in its autotuned
configurations with Triton 3.9: measure on a GPU before trusting its speed). The GPU machine runs Triton 3.6: this checks the locally installed Triton.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SM90_SMEM = 232448

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_sm90.py compiles kernels: run it with TRITON_INTERPRET unset")

import moe_unlearn.kernels.loramoe_delta as ld  # noqa: E402
import moe_unlearn.kernels.routing_stats as rs  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _signature(fn, ptr_types, consts):
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*fp32")
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_candidates() -> list[Path]:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    names = [bin_dir / "ptxas-blackwell", bin_dir / "ptxas"]
    system = shutil.which("ptxas")
    return [p for p in names if p.exists()] + ([Path(system)] if system else [])


def compile_one(fn, ptr_types, consts, num_warps, num_stages) -> dict:
    src = ASTSource(fn, _signature(fn, ptr_types, consts), consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        for ptxas in _ptxas_candidates():  # the first one that knows this PTX version
            rep = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, timeout=300)
            if rep.returncode == 0:
                break
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", rep.stderr)]
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", rep.stderr)]
    shared = int(k.metadata.shared)
    res = {"kernel": fn.fn.__name__, "num_warps": num_warps, "num_stages": num_stages,
           "consts": {n: str(v) for n, v in consts.items()}, "shared_bytes": shared,
           "registers": max(regs or [0]), "spill_bytes": max(spills or [0]), "ptxas_ok": rep.returncode == 0}
    res["ok"] = res["ptxas_ok"] and shared <= SM90_SMEM  # spills are reported (a speed issue), not failed
    return res


def cases(quick: bool):
    bf = {n: "*bf16" for n in ("x_ptr", "a_ptr", "b_ptr", "out_ptr", "g_ptr", "do_ptr", "dx_ptr")}
    configs = ld._fused_configs()[:1] if quick else ld._fused_configs()
    out = [(ld._fwd_fused_kernel, bf, dict(EB=8, RC=16, CDT=tl.bfloat16, ACCUMULATE=True, SAVE_H=True, **c.kwargs),
            c.num_warps, c.num_stages) for c in configs]
    r256 = dict(BLOCK_T=64, EB=1, RC=128, NRC=2, CDT=tl.bfloat16)  # rank 256: two 128-column chunks
    out += [
        (ld._fwd_h_kernel, bf, {**r256, "BLOCK_K": 64}, 4, 3),
        (ld._fwd_out_kernel, bf, {**r256, "BLOCK_N": 64, "ACCUMULATE": False}, 4, 3),
        (ld._bwd_h_kernel, bf, {**r256, "BLOCK_N": 64}, 4, 3),
        (ld._bwd_dx_dA_kernel, bf, dict(BLOCK_T=64, BLOCK_D=64, EB=8, RC=16, CDT=tl.bfloat16, CDT_X=tl.bfloat16,
                                        NEED_DX=True), 4, 3),
    ]
    if not quick:
        out += [(ld._bwd_dA_kernel, bf, {**r256, "BLOCK_D": 64}, 4, 3),
                (ld._bwd_dB_kernel, bf, {**r256, "BLOCK_N": 64}, 4, 3),
                (ld._bwd_dx_kernel, bf, {**r256, "BLOCK_D": 64}, 4, 3)]
    rtypes = {"logits_ptr": "*bf16", "seq_ptr": "*i64", "mask_ptr": "*i1", "slot_tok_ptr": "*i32",
              "part_count_ptr": "*i32", "perm_ptr": "*i64", "idx_in_ptr": "*i64", "idx_out_ptr": "*i64"}
    rconsts = dict(K=8, E_PAD=64, BLOCK_T=64, BLOCK_H=16, FUSED_GEMM=False, HAS_BIAS=False, HAS_PERM=False,
                   HAS_MASK=True, GIVEN_TOPK=False, RETURN_TOPK=False, SIGMOID=False, DOT_FP32=True)
    out.append((rs._routing_stats_kernel, rtypes, rconsts, 4, 3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for fn, types, consts, warps, stages in cases(args.quick):
        try:
            rows.append(compile_one(fn, types, consts, warps, stages))
        except Exception as exc:  # a kernel that does not compile is a failed row
            rows.append({"kernel": fn.fn.__name__, "consts": {n: str(v) for n, v in consts.items()}, "ok": False,
                         "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
        r = rows[-1]
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['kernel']} w={warps} s={stages} shared={r.get('shared_bytes')} "
              f"regs={r.get('registers')} spills={r.get('spill_bytes')} {r.get('error', '')}", flush=True)
    payload = {"triton": triton.__version__, "target": "cuda sm_90", "smem_limit": SM90_SMEM, "kernels": rows}
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
