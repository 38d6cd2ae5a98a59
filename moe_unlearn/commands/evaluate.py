"""`moe-unlearn evaluate`: quality, membership inference, multiple choice and routing shift of a
model (optionally with an unlearning patch applied) against the original; writes report.json,
report.md and routing_overlap.png into --out, all or nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_unlearn.commands import add_model_args, add_template_args, load_from_args
from moe_unlearn.errors import BadInputError
from moe_unlearn.validate import MAX_ITEMS, check_generation_length, check_int, check_number

DESCRIPTION = __doc__


def _target(text: str):
    from moe_unlearn.arch.target import ExpertTarget
    from moe_unlearn.errors import BadInputError

    try:
        return ExpertTarget.parse(text)
    except BadInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reference_auc(text: str):
    if text.startswith("muse-"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--reference-auc takes a number or muse-news / muse-books, got {text!r}") \
            from None


def _named_split(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--split takes NAME=FILE (e.g. neighbor=neighbor.jsonl), got {text!r}")
    return name, path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="evaluate a model (or a patch) against the original",
                              description=DESCRIPTION)
    p.add_argument("--model", required=True, help="model directory (save_pretrained) to evaluate")
    p.add_argument("--patch", help="unlearning patch (directory or its patch.json) to apply to --model first")
    p.add_argument("--original", help="original model directory for routing metrics; with --patch and no "
                                      "--original, --model before the patch is the original")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--forget", required=True, help=".jsonl ({question, answer} or {text}), .txt or dataset dir")
    p.add_argument("--retain", required=True, help="same formats as --forget")
    p.add_argument("--holdout", help="never-trained texts; enables the membership-inference AUCs")
    p.add_argument("--split", action="append", type=_named_split, default=[], metavar="NAME=FILE",
                   help="an extra split to score (repeatable), e.g. neighbor=neighbor.jsonl")
    p.add_argument("--completion", help=".jsonl of {question: statement cut before the answer, answer}: scored on "
                                        "prefix + ' ' + answer without the QA template (a format probe)")
    p.add_argument("--replay", choices=("original", "current"), default=None,
                   help="also score forget with the original model's routing forced at every MoE layer (its gate "
                        "values, or the current router's); needs --original or --patch")
    p.add_argument("--mcq", help=".jsonl of {question, choices, answer (index or letter)}")
    p.add_argument("--target", type=_target, help="LAYER:EXPERT whose gate mass on forget tokens is reported")
    p.add_argument("--reference-auc", type=_reference_auc,
                   help="MIA AUC (this report's orientation) of a model retrained without the forget set, or "
                        "muse-news / muse-books for MUSE's published retrained AUCs; gives MUSE's PrivLeak")
    p.add_argument("--reference-model", help="model directory retrained without the forget set: its MIA AUCs "
                                             "on the same forget/holdout give PrivLeak (instead of --reference-auc)")
    p.add_argument("--convention", choices=("muse", "open-unlearning"), default="muse",
                   help="benchmark convention for MIA tokens, Min-K%% rounding, VerbMem length, ROUGE stemming "
                        "and KnowMem stops (default: muse)")
    p.add_argument("--knowmem-icl", help="QA .jsonl/.json of few-shot examples for MUSE's KnowMem prompt")
    p.add_argument("--verbmem-max-new-tokens", type=int, default=None,
                   help="VerbMem: new tokens generated and reference tokens compared (default: --max-new-tokens "
                        "when that is given, else MUSE's 128)")
    p.add_argument("--lm-eval-task", action="append", default=[], metavar="TASK",
                   help="an lm-evaluation-harness task to run on the (patched) model (repeatable; needs "
                        "pip install 'moe-unlearn[eval]')")
    p.add_argument("--lm-eval-include", help="folder of local lm-eval task YAML files for --lm-eval-task")
    add_template_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens for QA answers (ROUGE-L; default 32); given, it also bounds VerbMem")
    p.add_argument("--no-generate", action="store_true", help="skip ROUGE-L and VerbMem (no decoding)")
    p.add_argument("--out", required=True, help="output directory (report.json, report.md, and "
                                                "routing_overlap.png when --original or --patch gives routing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.atomic import check_out_dir
    from moe_unlearn.data import DEFAULT_TEMPLATE
    from moe_unlearn.eval import PromptFormat, as_items, as_mcq_items, evaluate, record_routing
    from moe_unlearn.loading import check_model_dir, model_positions, resolve_device

    if args.verbmem_max_new_tokens is None:  # an explicit --max-new-tokens bounds every generation
        args.verbmem_max_new_tokens = max(1, args.max_new_tokens) if args.max_new_tokens is not None else 128
    if args.max_new_tokens is None:
        args.max_new_tokens = 32
    check_int("--batch-size", args.batch_size, low=1, high=MAX_ITEMS)
    if args.reference_auc is not None and args.reference_model:
        raise BadInputError("give --reference-auc or --reference-model, not both")
    if args.reference_auc is not None:
        check_number("--reference-auc", args.reference_auc, low=0.0, high=1.0)
    trust = args.trust_remote_code
    model_dirs = [check_model_dir(d, trust_remote_code=trust)
                  for d in (args.model, args.original, args.reference_model) if d]
    positions = model_positions(model_dirs[0])  # generation lengths are checked before any model loads
    if not args.no_generate:
        check_generation_length("--max-new-tokens", args.max_new_tokens, positions=positions, low=0)
        check_generation_length("--verbmem-max-new-tokens", args.verbmem_max_new_tokens, positions=positions)
    if args.tokenizer:
        check_model_dir(args.tokenizer, what="tokenizer", trust_remote_code=trust, need_config=False)
    check_out_dir(args.out, model_dirs=tuple(model_dirs))
    resolve_device(getattr(args, "device", None))  # a bad --device fails before any file is read
    if args.lm_eval_task:
        from moe_unlearn.eval.lm_eval_bridge import require_lm_eval

        require_lm_eval()
    # read every input before loading anything, so a bad file fails fast and writes nothing
    splits = {"forget": as_items(args.forget, "forget"), "retain": as_items(args.retain, "retain")}
    if args.holdout:
        splits["holdout"] = as_items(args.holdout, "holdout")
    for name, path in args.split:
        if name in splits:
            raise BadInputError(f"--split {name}=... clashes with another split of that name; rename it")
        splits[name] = as_items(path, name)
    mcq = as_mcq_items(args.mcq) if args.mcq else None
    icl = as_items(args.knowmem_icl, "knowmem-icl") if args.knowmem_icl else None
    completion = as_items(args.completion, "completion") if args.completion else None
    if args.replay and not (args.original or args.patch):
        raise BadInputError("--replay needs the original routing: give --original or --patch")
    if args.patch:
        from moe_unlearn.unlearning.patch import read_patch_meta

        if not Path(args.patch).exists():
            raise BadInputError(f"patch {args.patch} does not exist")
        meta = read_patch_meta(args.patch)  # a malformed patch.json fails here, before the model load
        run_cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        if args.template is None and run_cfg.get("template"):  # score the tokens the unlearning trained on
            args.template = str(run_cfg["template"])
        targets = meta.get("targets") or []
        if args.target is None and len(targets) == 1:  # the patch's one target: report its gate mass
            args.target = _target(str(targets[0]))
    template = (args.template or DEFAULT_TEMPLATE).replace("\\n", "\n")
    fmt = PromptFormat.from_template(template)

    progress = not args.quiet
    model, tokenizer = load_from_args(args, tokenizer_path=args.tokenizer)
    original, original_routing, before = None, None, None
    if args.original:
        original, _ = load_from_args(args, args.original, tokenizer=False)
    if args.patch:
        from moe_unlearn.unlearning import apply_patch  # lazy: the unlearning package is optional here

        if original is None:  # the model before the patch is the original: record its routing first
            original_routing = {name: record_routing(model, tokenizer, items, batch_size=args.batch_size, fmt=fmt,
                                                     progress=progress) for name, items in splits.items()}
            # and its EM / NLL (teacher-forced only), for the before -> after lines
            before = evaluate(model, tokenizer, forget=splits["forget"], retain=splits["retain"],
                              holdout=splits.get("holdout"), convention=args.convention, batch_size=args.batch_size,
                              generate=False, prompt_format=fmt, progress=progress).splits
        apply_patch(model, args.patch)

    report = evaluate(
        model, tokenizer, forget=splits.pop("forget"), retain=splits.pop("retain"),
        holdout=splits.pop("holdout", None), extra_splits=splits or None, mcq=mcq, original=original,
        original_routing=original_routing, target=args.target, reference_auc=args.reference_auc,
        reference_model=load_from_args(args, args.reference_model, tokenizer=False)[0] if args.reference_model
        else None,
        convention=args.convention, knowmem_icl=icl, verbmem_max_new_tokens=args.verbmem_max_new_tokens,
        lm_eval_tasks=args.lm_eval_task or None, lm_eval_include_path=args.lm_eval_include,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, generate=not args.no_generate,
        prompt_format=fmt, completion=completion, replay=args.replay, progress=progress)
    report.meta.update({"model_dir": args.model, "patch": args.patch, "original_dir": args.original})
    if before:
        report.meta["before_patch"] = {n: {"exact_match": m.exact_match, "nll": m.nll} for n, m in before.items()}
    paths = report.write_all(args.out)
    print(report.to_markdown())
    def num(x) -> str:
        return "-" if x is None else f"{x:.3f}"

    for name, m in (before or {}).items():
        after = report.splits[name]
        print(f"{name}: exact match {num(m.exact_match)} -> {num(after.exact_match)}, NLL {num(m.nll)} -> "
              f"{num(after.nll)} (before -> after the patch)")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
