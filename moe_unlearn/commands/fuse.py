"""`moe-unlearn fuse`: merge adapter patches of separate forget requests into one patch.

    moe-unlearn fuse --model base/ --patch req1/ --patch req2/ --out fused/

Each patch must be an adapter patch (`moe-unlearn unlearn --adapter lora`) made from the base
model; the fused patch is the least-squares merge of their changes over each request's inputs
(EUL's fusion; see moe_unlearn.unlearning.fusion), applied and reverted like any patch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_unlearn.commands import add_model_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fuse", help="fuse adapter patches of several forget requests into one",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model the patches were made from")
    p.add_argument("--patch", action="append", default=[], help="an adapter patch (twice or more)")
    p.add_argument("--out", required=True, help="new (or empty) directory for the fused patch")
    p.add_argument("--ridge", type=float, default=1e-6,
                   help="relative ridge lambda / (trace / in) of the regression (default 1e-6)")
    p.add_argument("--retain-weight", type=float, default=1.0,
                   help="weight of the retain inputs in each request's Gram matrix (default 1)")
    p.add_argument("--alpha", type=float, default=0.9,
                   help="off-diagonal scale of each Gram matrix (RegMean's regularisation; 1 = plain regression)")
    add_model_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.atomic import check_out_dir
    from moe_unlearn.commands import load_from_args
    from moe_unlearn.errors import BadInputError
    from moe_unlearn.unlearning.fusion import fuse_patches
    from moe_unlearn.unlearning.patch import read_patch_meta

    if len(args.patch) < 2:
        raise BadInputError("give at least two --patch directories to fuse")
    for p in args.patch:
        read_patch_meta(p)  # a missing or malformed patch fails before the model load
    from moe_unlearn.loading import check_model_dir

    mdir = check_model_dir(args.model, trust_remote_code=args.trust_remote_code)  # a folder, or a cached hub id
    check_out_dir(Path(args.out), model_dirs=(mdir, *args.patch), must_be_empty=True, what="--out")
    model, _ = load_from_args(args, tokenizer=False)
    out = fuse_patches(model, args.patch, args.out, ridge=args.ridge, retain_weight=args.retain_weight,
                       alpha=args.alpha)
    print(f"fused {len(args.patch)} patches into {out}")
    return 0
