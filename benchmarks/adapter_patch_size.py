"""Patch size of one unlearned expert: full slice (new + original values) vs a low-rank adapter
(factors, revert corrections, Gram statistics), at a real model's expert shape.

    python benchmarks/adapter_patch_size.py [--shape mixtral] [--rank 8] [--dtype bfloat16]

The corrections (`fix_index` / `fix_value`, the elements where round(W0 + B A) - B A does not round
back to W0) depend on how far the weights move, so they are measured: W0 ~ N(0, 0.02) at the model's
expert shape, a random rank-r change B A scaled to an RMS of `rel` x RMS(W0) for several `rel`. The
factors are counted in fp32, the Gram factors at their cap (`adapter_gram_rank`, in x k fp32, forget
and retain). Writes benchmarks/results/adapter_patch_size_<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import device_name  # noqa: E402

from moe_unlearn.atomic import write_text  # noqa: E402
from moe_unlearn.unlearning.adapters import revert_fixes  # noqa: E402

SHAPES = {  # name: (hidden H, expert intermediate I): gate_up [2I, H], down [H, I]
    "mixtral": (4096, 14336),
    "qwen3_moe_30b": (2048, 768),
    "olmoe": (2048, 1024),
    "bench": (96, 48),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--gram-rank", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--rel", default="0.001,0.01,0.1")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    h, i = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)
    mats = {"gate_up": (2 * i, h), "down": (h, i)}
    full_bytes = 2 * sum(o * n for o, n in mats.values()) * dtype.itemsize  # new + original
    factor_bytes = sum(4 * args.rank * (o + n) for o, n in mats.values())
    gram_bytes = sum(2 * 4 * n * min(n, args.gram_rank) for _, n in mats.values())
    rows = []
    for rel in (float(x) for x in args.rel.split(",")):
        fixes = {}
        for name, (o, n) in mats.items():
            w0 = (torch.randn(o, n, generator=g) * 0.02).to(dtype)
            a = torch.randn(args.rank, n, generator=g)
            b = torch.randn(o, args.rank, generator=g)
            scale = rel * 0.02 / float((b @ a).pow(2).mean().sqrt())
            b = b * scale
            idx, val = revert_fixes(w0, a, b)
            fixes[name] = {"fixes": int(idx.numel()), "fraction": round(idx.numel() / w0.numel(), 6)}
        fix_bytes = sum(f["fixes"] for f in fixes.values()) * (4 + dtype.itemsize)
        total = factor_bytes + fix_bytes + gram_bytes
        rows.append({"relative_change_rms": rel, "fixes": fixes, "fix_bytes": fix_bytes, "adapter_bytes": total,
                     "adapter_bytes_without_grams": factor_bytes + fix_bytes, "full_slice_bytes": full_bytes,
                     "ratio": round(total / full_bytes, 5)})
        fracs = ", ".join(f"{k} {v['fraction']:.4%}" for k, v in fixes.items())
        print(f"rel {rel:g}: fixes {fracs}; adapter "
              f"{total / 2**20:.1f} MiB (grams {gram_bytes / 2**20:.1f}) vs full slice {full_bytes / 2**20:.1f} MiB")
    out = {"benchmark": "adapter_patch_size", "device": device_name(torch.device("cpu")), "shape": args.shape,
           "hidden": h, "intermediate": i, "dtype": args.dtype, "rank": args.rank, "gram_rank": args.gram_rank,
           "factor_bytes": factor_bytes, "gram_bytes": gram_bytes, "rows": rows}
    path = Path(args.out) / f"adapter_patch_size_{args.shape}.json"
    write_text(path, json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
