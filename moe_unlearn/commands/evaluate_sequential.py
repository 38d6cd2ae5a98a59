"""`moe-unlearn evaluate-sequential`: MUSE's sustainability evaluation (unlearning requests applied
one after another, stacked patches; metrics after each) or, with --sizes, its scalability
evaluation (growing forget sets, each from the original model). Writes <kind>.json and <kind>.md
into --out, all or nothing; the patches of every request go to --out/patches."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from moe_unlearn.errors import BadInputError

DESCRIPTION = __doc__


def _named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, path


def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    from moe_unlearn.commands import add_model_args
    from moe_unlearn.unlearning import OBJECTIVES, SCOPES

    p = subparsers.add_parser("evaluate-sequential", help="MUSE sustainability / scalability evaluation",
                              description=DESCRIPTION)
    p.add_argument("--model", required=True, help="model directory (save_pretrained, with tokenizer)")
    p.add_argument("--request", action="append", type=_named, default=[], metavar="NAME=FILE",
                   help="one unlearning request's forget data, in order (repeatable); with --sizes, exactly one")
    p.add_argument("--retain", required=True, help="retain data (kept by unlearning, scored as utility)")
    p.add_argument("--split", action="append", type=_named, default=[], metavar="NAME=FILE",
                   help="a further utility split (repeatable)")
    p.add_argument("--holdout", help="never-trained texts of the forget kind: MIA AUC after each step")
    p.add_argument("--sizes", type=_sizes, help="scalability: comma-separated forget-set sizes (first n records)")
    p.add_argument("--mode", default="stacked", help="how requests are applied: stacked (patches in order, the "
                   "default) or fused (adapters each trained from the base model, fused; needs --adapter lora)")
    p.add_argument("--adapter", choices=("lora",), default=None, help="train low-rank adapters on the experts")
    p.add_argument("--adapter-rank", type=int, default=8)
    p.add_argument("--method", default="npo", choices=sorted(OBJECTIVES))
    p.add_argument("--scope", default="uoe", choices=SCOPES)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--convention", choices=("muse", "open-unlearning"), default="muse")
    p.add_argument("--no-generate", action="store_true", help="skip ROUGE-L and VerbMem")
    add_model_args(p)
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.commands import load_from_args
    from moe_unlearn.eval.items import as_items
    from moe_unlearn.eval.sequential import MODES, UnlearnRequest, evaluate_scalability, evaluate_sequential

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BadInputError(f"--out {out} exists and is not empty; pass a new directory")
    if not args.request:
        raise BadInputError("give at least one --request NAME=FILE")
    if args.sizes is not None and len(args.request) != 1:
        raise BadInputError("--sizes (scalability) takes exactly one --request, the whole forget set")
    if args.mode not in MODES:
        raise BadInputError(f"unknown --mode {args.mode!r}; registered: {sorted(MODES)}")
    if args.steps < 1 or args.batch_size < 1 or args.adapter_rank < 1:
        raise BadInputError("--steps, --batch-size and --adapter-rank must be >= 1")
    if args.mode == "fused" and args.adapter is None:
        raise BadInputError("--mode fused fuses adapters: add --adapter lora")
    # read every input before loading the model, so a bad file fails fast and writes nothing
    requests = [UnlearnRequest(n, as_items(f, n)) for n, f in args.request]
    retain = as_items(args.retain, "retain")
    utility = {n: as_items(f, n) for n, f in args.split}
    holdout = as_items(args.holdout, "holdout") if args.holdout else None
    model, tok = load_from_args(args)
    ukw = dict(method=args.method, scope=args.scope, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
               progress=not args.quiet)
    if args.adapter is not None:
        ukw.update(adapter=args.adapter, adapter_rank=args.adapter_rank)
    ekw = dict(convention=args.convention, generate=not args.no_generate)
    patches = out.parent / f".{out.name}.patches"
    if patches.exists():
        raise BadInputError(f"{patches} exists (left by an interrupted run?); remove it first")
    try:
        if args.sizes is not None:
            res = evaluate_scalability(model, tok, requests[0].forget, args.sizes, retain=retain, utility=utility,
                                       holdout=holdout, mode=args.mode, unlearn_kwargs=ukw, eval_kwargs=ekw,
                                       work_dir=patches)
        else:
            if holdout is not None:
                requests = [UnlearnRequest(r.name, r.forget, holdout) for r in requests]
            res = evaluate_sequential(model, tok, requests, retain=retain, utility=utility, mode=args.mode,
                                      unlearn_kwargs=ukw, eval_kwargs=ekw, work_dir=patches)
        paths = res.write_all(out)
        patches.rename(out / "patches")
    finally:
        if patches.exists():  # a failed run leaves nothing behind
            shutil.rmtree(patches, ignore_errors=True)
    print(res.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
