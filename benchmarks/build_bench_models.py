"""Build the bench models (one thread, resumable: rerun after an interruption) and their storage maps.

    python benchmarks/build_bench_models.py [--cache DIR] [--models natural implanted allparam] [--no-locate]

Each model is trained (or loaded from the cache / the shipped weights), then `locate` writes
benchmarks/results/storage_<model>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--models", nargs="+", default=["natural", "implanted"])
    ap.add_argument("--no-locate", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from moe_unlearn.bench_model import bench_config, load_or_build

    for name in args.models:
        for retrained in (False, True):
            t = time.time()
            b = load_or_build(bench_config(name, retrained=retrained), cache_root=args.cache, progress=False)
            print(f"{b.meta['config']['name']}: {b.path} built={b.built} EM {b.meta['exact_match']} "
                  f"({time.time() - t:.0f} s)", flush=True)
        if not args.no_locate:
            from moe_unlearn.bench_model.storage import locate_bench

            locate_bench(name, cache_root=args.cache, out_dir=args.out, progress=False)
            print(f"storage map of {name} written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
