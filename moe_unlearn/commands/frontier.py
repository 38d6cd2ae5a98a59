"""`moe-unlearn frontier`: methods x variants x learning rates x seeds x step counts on a built-in
bench model, read at matched forgetting.

Every (method, variant, lr, seed) runs once to the largest step count with a constant learning
rate and is evaluated at each step count on the way. Results go to
<out>/frontier_<model>.json (every run; rerunning skips the runs already there, so an interrupted
run resumes), .md (best median utility EM per method and variant among learning rates whose
median forget EM is at most the guess level + 0.05) and .png (the frontier curves).
Variants: full (every parameter), uoe (the top-affinity expert + its router, router anchor),
uoe+kpb (uoe + retain-routing KL); learning-rate grids are fixed per scope (see --lrs).
With --shard fsdp2 under torchrun the model is sharded over the ranks and each step's micro-batches
are split between them: the results equal one process with --grad-accum times the number of ranks.
"""

from __future__ import annotations

import argparse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    from moe_unlearn.frontier import FrontierConfig

    d = FrontierConfig()
    p = subparsers.add_parser("frontier", help="learning-rate frontier of unlearning methods on a bench model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="bench model: natural (default) or localized (positive control)")
    p.add_argument("--methods", type=_names, default=d.methods, help=f"default {','.join(d.methods)}")
    p.add_argument("--variants", type=_names, default=d.variants, help=f"default {','.join(d.variants)}")
    p.add_argument("--lrs", type=_floats, default=None,
                   help="one learning-rate grid for every variant (default: per scope, full 3e-5..1e-2, one-expert "
                        "scopes 3e-4..1e-1, six half-decade points each)")
    p.add_argument("--steps", type=_ints, default=d.steps, help="step counts to evaluate at (default 40,120)")
    p.add_argument("--seeds", type=_ints, default=d.seeds, help="default 0,1,2")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--out", default="benchmarks/results", help="results directory (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="the tiny test bench model (seconds, for smoke tests)")
    p.add_argument("--cache-dir", default=None, help="bench model cache (default $MOE_UNLEARN_CACHE or "
                                                     "~/.cache/moe-unlearn)")
    p.add_argument("--probes", type=_names, default=(),
                   help="extra measurements per run, comma-separated: replay (forget EM with the original routing "
                        "forced), paraphrase (second-question and completion EM), relearn (fine-tune on 15%% of "
                        "the forget facts, EM on the rest over steps; costly)")
    p.add_argument("--relearn-variants", type=_names, default=(),
                   help="run the relearn probe only for these variants (default: all)")
    p.add_argument("--realization", type=int, default=0,
                   help="which build of the bench recipe: 0 (default) or r > 0 (another world, initialisation and "
                        "data order; r = 2 forgets another domain); results go to frontier_<model>_r<r>.json")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (per rank)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    from moe_unlearn.commands import add_shard_arg

    add_shard_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.errors import BadInputError
    from moe_unlearn.frontier import FrontierConfig, run_frontier

    if args.batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg = FrontierConfig(model=args.model, methods=args.methods, variants=args.variants, steps=args.steps,
                         seeds=args.seeds, batch_size=args.batch_size, quick=args.quick,
                         lrs={v: args.lrs for v in args.variants} if args.lrs else {}, probes=args.probes,
                         relearn_variants=args.relearn_variants, realization=args.realization,
                         grad_accum=args.grad_accum, shard=args.shard)
    cfg.validate()  # every input checked before the model loads
    from moe_unlearn.commands import launch_shard

    cfg.shard = launch_shard(args)  # or an accelerate FSDP config's; refused without torchrun
    from moe_unlearn.atomic import check_out_dir

    check_out_dir(args.out)
    res = run_frontier(cfg, out_dir=args.out, cache_dir=args.cache_dir, progress=args.progress,
                       log=lambda s: print(s, flush=True))
    print(res.summary)
    return 0
