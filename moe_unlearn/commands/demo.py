"""`moe-unlearn demo`: train (once) a small MoE that knows fictitious facts, make it forget one
domain with NPO (--quick: GA too) training all weights (`full`), one expert (`uoe`) or a covering
set of experts with projections (`cov+grip+null`), at two learning rates each, and compare them at
matched forgetting, with utility measured on facts that unlearning never saw; routing replay then
shows how much of the forgetting was re-routing. The demo's exact grid: moe_unlearn.demo.DemoConfig.

The model is cached under --cache-dir (default $MOE_UNLEARN_CACHE or ~/.cache/moe-unlearn)
and reused; --rebuild trains it again. Reports go to --out (replacing an earlier demo output).
The full benchmark is `moe-unlearn frontier`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="end-to-end demo on a built-in fictitious-facts MoE",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-output", help="report directory (default: ./demo-output)")
    p.add_argument("--quick", action="store_true",
                   help="tiny world, tiny model, a few steps: a smoke test that runs in well under a minute")
    p.add_argument("--rebuild", action="store_true", help="train the benchmark model again even if cached")
    p.add_argument("--cache-dir", default=None,
                   help="where benchmark models are cached (default: $MOE_UNLEARN_CACHE or ~/.cache/moe-unlearn)")
    p.add_argument("--progress", action="store_true", help="progress bars for training and evaluation")
    return p


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.demo import run_demo

    run_demo(args.out, quick=args.quick, rebuild=args.rebuild, cache_dir=args.cache_dir, progress=args.progress)
    return 0
