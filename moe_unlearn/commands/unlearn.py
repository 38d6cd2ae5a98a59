"""`moe-unlearn unlearn`: unlearn a forget set from a local MoE model and write a patch.

Writes OUT/patch.safetensors + OUT/patch.json (or, with --merge, a whole model saved with
save_pretrained into OUT). OUT must be new or empty and must not be the model directory.
"""

from __future__ import annotations

import argparse
import json

from moe_unlearn.unlearning.objectives import OBJECTIVES
from moe_unlearn.unlearning.scopes import SCOPES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("unlearn", help="unlearn a forget set; write a reversible patch",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (save_pretrained layout, with tokenizer)")
    p.add_argument("--forget", required=True, help=".txt (one document per line), .jsonl, or a save_to_disk dir")
    p.add_argument("--retain", default=None, help="retain data (same formats); needed by graddiff")
    p.add_argument("--field", default=None, help="jsonl/dataset field holding the text")
    p.add_argument("--method", default="npo", choices=sorted(OBJECTIVES))
    p.add_argument("--scope", default="uoe", choices=SCOPES)
    p.add_argument("--target", action="append", default=None, metavar="L:E",
                   help="target expert LAYER:EXPERT (repeat for topm; 'L:shared' needs --allow-shared)")
    p.add_argument("--attribution", default=None, help="attribution.json from `moe-unlearn attribute` "
                                                      "(used when --target is not given)")
    p.add_argument("--top-m", type=int, default=None, help="experts for --scope topm from the attribution "
                                                          "(default 2)")
    p.add_argument("--coverage", type=float, default=None,
                   help="--scope topm: take the experts that together cover this share of the forget tokens "
                        "(attributes the forget data, with --retain for selectivity)")
    p.add_argument("--router-projection", choices=["grip"], default=None,
                   help="grip: keep the trained routers' logits on retain inputs fixed (change projected off "
                        "their span after every step)")
    p.add_argument("--expert-projection", choices=["retain_null"], default=None,
                   help="retain_null: project the trained experts' change off the span of the retain tokens "
                        "routed to them (uoe / topm)")
    p.add_argument("--projection-energy", type=float, default=0.99,
                   help="energy fraction of the retain span the projections keep (default 0.99)")
    p.add_argument("--retain-weighting", choices=["trace"], default=None,
                   help="trace: weight retain tokens by how forget-critical their experts are")
    p.add_argument("--topm-layer", type=int, default=None, help="take the topm experts from this layer only")
    p.add_argument("--allow-shared", action="store_true", help="allow a shared expert as target")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--merge", action="store_true", help="save the whole unlearned model instead of a patch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--epochs", type=int, default=None, help="passes over the forget set (instead of --steps)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr-schedule", default="constant", choices=("constant", "linear", "cosine"))
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--anchor-weight", type=float, default=1.0, help="SEUF router anchor weight (uoe/topm)")
    p.add_argument("--retain-routing-weight", type=float, default=0.0,
                   help="KL(original || current) routing on retain tokens at trained routers")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="method hyperparameter, e.g. --set beta=0.1 --set retain_loss=kl")
    p.add_argument("--no-prefix-cache", action="store_true", help="run the whole model every step")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (in OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT.ckpt")
    p.add_argument("--seed", type=int, default=0,
                   help="orders texts into batches, forget batches per epoch and the forget/retain pairing")
    p.add_argument("--loss-tokens", choices=["answer", "all"], default="answer",
                   help="question/answer records: score the answer tokens only (default) or every token")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own Python code to run (off by default)")
    return p


def _parse_sets(items: list[str]) -> dict:
    from moe_unlearn.errors import BadInputError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BadInputError(f"--set {item!r}: expected NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value  # a bare string such as retain_loss=kl
    return out


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.commands.attribute import load_model_and_tokenizer
    from moe_unlearn.data import load_texts
    from moe_unlearn.errors import BadInputError
    from moe_unlearn.loading import check_model_dir, resolve_device
    from moe_unlearn.unlearning import unlearn
    from moe_unlearn.unlearning.checks import check_unlearn_args
    from moe_unlearn.validate import check_number

    # every input is checked before the (slow) model load: a typo costs nothing and writes nothing
    if args.target and args.attribution:
        raise BadInputError("give --target or --attribution, not both")
    if args.top_m is not None and args.scope != "topm":
        raise BadInputError(f"--top-m is only read by --scope topm (got --scope {args.scope})")
    if args.coverage is not None:
        if args.scope != "topm":
            raise BadInputError(f"--coverage selects several experts: use --scope topm (got --scope {args.scope})")
        check_number("--coverage", args.coverage, low=0.0, high=1.0, low_open=True)
    check_number("--projection-energy", args.projection_energy, low=0.0, high=1.0, low_open=True)
    for flag, value in (("--router-projection", args.router_projection), ("--expert-projection",
                        args.expert_projection), ("--retain-weighting", args.retain_weighting)):
        if value is not None and args.retain is None:
            raise BadInputError(f"{flag} {value} needs --retain data")
    target = args.target
    if target is None and args.attribution:
        from moe_unlearn.attribution import Attribution

        target = Attribution.from_json(args.attribution)
    method_kwargs = _parse_sets(args.set)
    top_m = 2 if args.top_m is None else args.top_m
    model_dir = check_model_dir(args.model, trust_remote_code=args.trust_remote_code)
    steps = None if args.epochs else args.steps
    check_unlearn_args(method=args.method, scope=args.scope, target=target, top_m=top_m, topm_layer=args.topm_layer,
                       steps=steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, max_length=args.max_length, lr_schedule=args.lr_schedule,
                       warmup_steps=args.warmup_steps, anchor_weight=args.anchor_weight,
                       retain_routing_weight=args.retain_routing_weight, method_kwargs=method_kwargs,
                       checkpoint_every=args.checkpoint_every, seed=args.seed, has_retain=args.retain is not None,
                       merge=args.merge, out_dir=args.out, model_dir=model_dir, resume=args.resume)
    resolve_device(args.device)
    for source in (args.forget, args.retain):  # read once to check (the engine reads them again, cheaply)
        if source is not None:
            load_texts(source, field=args.field)
    model, tokenizer = load_model_and_tokenizer(model_dir, trust_remote_code=args.trust_remote_code,
                                                device=args.device)
    res = unlearn(model, args.forget, args.retain, tokenizer=tokenizer, method=args.method, scope=args.scope,
                  target=target, top_m=top_m, topm_layer=args.topm_layer, allow_shared=args.allow_shared,
                  steps=steps, epochs=args.epochs, lr=args.lr,
                  batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
                  lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, anchor_weight=args.anchor_weight,
                  retain_routing_weight=args.retain_routing_weight, method_kwargs=method_kwargs,
                  prefix_cache=not args.no_prefix_cache, out_dir=args.out, merge=args.merge, model_dir=model_dir,
                  resume=args.resume, checkpoint_every=args.checkpoint_every, seed=args.seed,
                  progress=not args.quiet, field=args.field, coverage=args.coverage,
                  router_projection=args.router_projection, expert_projection=args.expert_projection,
                  projection_energy=args.projection_energy, retain_weighting=args.retain_weighting,
                  loss_tokens=args.loss_tokens)
    where = res.merged_path or res.patch_path
    terms = ", ".join(f"{k}={v:.4g}" for k, v in res.final_terms.items())
    print(f"unlearned {args.method}/{args.scope} targets={res.targets or '-'} "
          f"trainable={res.trainable_params} steps={len(res.history.steps)} in {res.wall_time:.1f}s")
    print(f"final: {terms}")
    print(f"wrote {where}")
    return 0
