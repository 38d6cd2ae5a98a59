"""`moe-unlearn demo`: train (once) a small MoE that knows fictitious facts, make it forget one
domain with GA and NPO under the `full` and `uoe` scopes, plus `uoe+kpb` (uoe with
knowledge-preserving expert balancing: a retain-routing KL term at the trained router), and
compare the runs side by side.

The model is cached under --cache-dir (default $MOE_UNLEARN_CACHE or ~/.cache/moe-unlearn)
and reused; --rebuild trains it again. Reports go to --out (replacing an earlier demo output).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="end-to-end demo on a built-in fictitious-facts MoE",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-output", help="report directory (default: ./demo-output)")
    p.add_argument("--quick", action="store_true",
                   help="tiny world, tiny model, a few steps: a smoke test that runs in about a minute")
    p.add_argument("--rebuild", action="store_true", help="train the benchmark model again even if cached")
    p.add_argument("--cache-dir", default=None,
                   help="where benchmark models are cached (default: $MOE_UNLEARN_CACHE or ~/.cache/moe-unlearn)")
    p.add_argument("--sweep", action="store_true",
                   help="also run every method and scope at a few more learning rates and plot forget vs retain "
                        "exact match (demo_tradeoff.png), to compare the scopes at similar forgetting")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.demo import run_demo

    run_demo(args.out, quick=args.quick, rebuild=args.rebuild, cache_dir=args.cache_dir,
             sweep=args.sweep, progress=not args.no_progress)
    return 0
