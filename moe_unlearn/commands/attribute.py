"""`moe-unlearn attribute`: which experts of a local MoE model the forget data uses.

Writes OUT/attribution.json and OUT/attribution.png (both or neither) and prints the top
targets with their near-tie flags. Under torchrun each rank reads its share of the data (the
sums are all-reduced); with --shard fsdp2 each rank also stores a shard of every layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_unlearn.atomic import staged_files
from moe_unlearn.commands import add_model_args, add_shard_arg, launch_shard, load_from_args

OUTPUT_FILES = ("attribution.json", "attribution.png")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("attribute", help="rank the routed experts by how much the data uses them",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (save_pretrained layout, with tokenizer)")
    p.add_argument("--data", required=True, help=".txt (one document per line), .jsonl, or a save_to_disk dir")
    p.add_argument("--out", required=True, help="output directory (created; existing files of the same name "
                                                "are replaced)")
    p.add_argument("--field", default=None, help="jsonl/dataset field holding the text (default: 'text', "
                                                 "else question/answer)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="longer texts are truncated (and counted)")
    p.add_argument("--stability", action="store_true",
                   help="also compare the expert ranking of two random halves of the data")
    p.add_argument("--seed", type=int, default=0, help="seed of the --stability split")
    p.add_argument("--top", type=int, default=5, help="how many candidates to print")
    p.add_argument("--retain", default=None,
                   help="retain data (same formats): also report selectivity (forget / retain selection share) and "
                        "the premise check of the target (coverage >= 0.5 and selectivity >= 2)")
    p.add_argument("--coverage", type=float, default=None,
                   help="also choose the experts that cover this share of the forget tokens (for --scope topm), "
                        "stored in attribution.json")
    add_model_args(p)
    add_shard_arg(p)
    return p


def write_outputs(attribution, out: Path) -> None:
    """Both files or neither: they are written into a staging dir first, then moved in."""
    with staged_files(out, owned=OUTPUT_FILES) as tmp:
        attribution.to_json(tmp / OUTPUT_FILES[0])
        attribution.plot(tmp / OUTPUT_FILES[1])


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.arch import find_moe_layers
    from moe_unlearn.atomic import check_out_dir
    from moe_unlearn.attribution import attribute_experts
    from moe_unlearn.data import load_texts
    from moe_unlearn.distributed import is_main
    from moe_unlearn.loading import check_model_dir, resolve_device
    from moe_unlearn.validate import check_int, check_number

    for name in ("batch_size", "max_length", "top"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), low=1)
    if args.coverage is not None:
        check_number("--coverage", args.coverage, low=0.0, high=1.0, low_open=True)
    check_int("--seed", args.seed, low=0)
    model_dir = check_model_dir(args.model, trust_remote_code=args.trust_remote_code)
    out = Path(args.out)
    check_out_dir(out, model_dirs=(model_dir,))
    resolve_device(args.device)
    texts = load_texts(args.data, field=args.field)  # data errors before the (slow) model load
    retain = load_texts(args.retain, field=args.field) if args.retain else None
    shard = launch_shard(args)  # under torchrun / accelerate launch: each rank reads its share
    model, tokenizer = load_from_args(args, shard=shard)
    find_moe_layers(model)  # NotAnMoEModel / UnsupportedFamily before any work
    attribution = attribute_experts(model, texts, tokenizer=tokenizer, batch_size=args.batch_size,
                                    max_length=args.max_length, stability=args.stability, seed=args.seed,
                                    progress=True, retain=retain)
    if not is_main():  # every rank holds the all-reduced attribution; rank 0 writes it
        return 0
    if args.coverage is not None:
        from moe_unlearn.attribution import select_targets

        chosen = select_targets(attribution, coverage=args.coverage)
        attribution.meta["coverage_targets"] = {"coverage": args.coverage, "targets": [list(t) for t in chosen],
                                                "reached": attribution.coverage(chosen)}
        print(f"experts covering {attribution.meta['coverage_targets']['reached']:.2f} of the forget tokens: "
              + " ".join(f"{lay}:{e}" for lay, e in chosen))
    write_outputs(attribution, out)
    print(attribution.summary(args.top))
    best = attribution.top(1)[0]
    note = "  (NEAR-TIE: the runner-up is within 1%; consider more data)" if best.near_tie else ""
    print(f"target: layer {best.layer} expert {best.expert}{note}")
    print(f"wrote {out / OUTPUT_FILES[0]} and {out / OUTPUT_FILES[1]}")
    return 0
