"""`moe-unlearn locate`: a storage map (where the model keeps the forget knowledge) by ablation.

    moe-unlearn locate --model DIR --forget forget.jsonl --utility utility.jsonl --out OUT
    moe-unlearn locate --bench natural --out benchmarks/results

Ablates embeddings, attention per layer, the shared expert per layer, all routed experts per layer
(and the middle layers together), the attributed target, the coverage set and each layer's top
expert, by zeroing, mean-replacement (retain mean without position 0) and re-initialisation, and
reports forget / utility exact match (NLL for plain texts) with selectivity = forget drop / utility
drop. Writes OUT/storage_map.{json,md,png} (all or none); --bench writes storage_<name>.*.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_unlearn.commands import add_model_args, load_from_args
from moe_unlearn.errors import BadInputError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("locate", help="storage map: which components hold the forget knowledge",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local model directory (save_pretrained layout, with tokenizer)")
    src.add_argument("--bench", help="a built-in bench model by name (natural, implanted, localized, allparam)")
    p.add_argument("--forget", help="forget data (.jsonl QA records or texts); with --model")
    p.add_argument("--utility", help="utility data the ablations should keep; with --model")
    p.add_argument("--retain", default=None, help="data for the ablation means (default: --utility)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--methods", default="zero,mean,reinit", help="comma-separated: zero, mean, reinit")
    p.add_argument("--sample", type=int, default=96, help="items per split (a seeded draw)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--coverage", type=float, default=0.8, help="coverage of the coverage-set row")
    p.add_argument("--middle", default=None, help="layers of the middle groups, e.g. 2,3,4 (default: the middle band)")
    p.add_argument("--cache-dir", default=None, help="bench model cache (with --bench)")
    add_model_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.atomic import check_out_dir
    from moe_unlearn.bench_model.storage import locate_bench
    from moe_unlearn.locate import LocateConfig, storage_map

    try:
        middle = None if args.middle is None else tuple(int(x) for x in args.middle.split(",") if x.strip())
    except ValueError:
        raise BadInputError(f"--middle takes comma-separated layer numbers, got {args.middle!r}") from None
    config = LocateConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                          sample=args.sample, batch_size=args.batch_size, coverage=args.coverage, middle=middle)
    config.validate()
    out = Path(args.out)
    if args.bench is not None:
        from moe_unlearn.bench_model import BENCH_MODELS

        if args.bench not in BENCH_MODELS:
            raise BadInputError(f"unknown bench model {args.bench!r}; choose one of {', '.join(BENCH_MODELS)}")
        check_out_dir(out)
        smap = locate_bench(args.bench, cache_root=args.cache_dir, out_dir=out, config=config)
        stem = f"storage_{args.bench}"
    else:
        if not args.forget or not args.utility:
            raise BadInputError("--model needs --forget and --utility")
        from moe_unlearn.eval.items import as_items
        from moe_unlearn.loading import check_model_dir, model_layers
        from moe_unlearn.validate import check_layers

        model_dir = check_model_dir(args.model, trust_remote_code=args.trust_remote_code)
        check_layers("--middle", config.middle or (), model_layers(model_dir))  # before the model loads
        check_out_dir(out, model_dirs=(model_dir,))
        data = {k: as_items(getattr(args, k), k) for k in ("forget", "utility")}  # data errors before loading
        retain = as_items(args.retain, "retain") if args.retain else None
        model, tokenizer = load_from_args(args)
        smap = storage_map(model, tokenizer, data["forget"], data["utility"], retain=retain, config=config)
        stem = "storage_map"
        smap.write(out, stem)
    print(smap.to_markdown())
    print(f"wrote {out / (stem + '.json')}, .md and .png")
    return 0
