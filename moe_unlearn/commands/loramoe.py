"""`moe-unlearn loramoe train`: fine-tune a saved model with LoRAMoE (+ LBC), plain LoRA or all weights."""

from __future__ import annotations

import argparse
import json

from moe_unlearn.commands import add_model_args, load_from_args
from moe_unlearn.errors import BadInputError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,3, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("loramoe", help="LoRAMoE fine-tuning (world knowledge kept by the balancing constraint)")
    sub = p.add_subparsers(dest="loramoe_command", required=True)
    t = sub.add_parser("train", help="fine-tune a model on a jsonl file",
                       description="Fine-tune a saved transformers model on a jsonl file with 'text', 'prompt'/"
                                   "'response' (loss on the response only) or 'question'/'answer' (loss on the answer), and an optional 'type' per record. "
                                   "Writes adapter/ (or model/ for --method full), routing stats and plots, "
                                   "history.json and finetune_config.json into --out.")
    t.add_argument("--model", required=True, help="folder with a saved model and its tokenizer")
    t.add_argument("--data", required=True, help=".jsonl file (or .txt / datasets save_to_disk folder)")
    t.add_argument("--out", required=True, help="output folder (must be new or empty, unless --resume)")
    t.add_argument("--method", choices=("loramoe", "lora", "full"), default="loramoe",
                   help="loramoe (default); lora = one expert, no router; full = train every weight")
    t.add_argument("--experts", type=int, default=6, help="LoRA experts per wrapped linear (default 6)")
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--alpha", type=float, default=32.0)
    t.add_argument("--dropout", type=float, default=0.05)
    t.add_argument("--targets", type=_str_list, default=["gate_proj", "up_proj", "down_proj"],
                   help="comma-separated linear names to wrap (add q_proj,k_proj,v_proj,o_proj for attention)")
    t.add_argument("--router", choices=("dense", "topk"), default="dense")
    t.add_argument("--top-k", type=int, default=2, help="experts per token with --router topk")
    t.add_argument("--groups", type=_int_list, default=None, help="experts per group, e.g. 3,3")
    t.add_argument("--group-types", type=_str_list, default=None,
                   help="the record 'type' each group serves, e.g. world,task")
    t.add_argument("--lbc-weight", type=float, default=None,
                   help="weight of the balancing constraint (default 0.1 with --groups, else 0)")
    t.add_argument("--lbc-delta", type=float, default=0.1)
    t.add_argument("--lbc-convention", choices=("divide", "official"), default="divide",
                   help="divide (default): the matching group gets more mass; official: as the reference code")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0 = none)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--no-progress", action="store_true")
    add_model_args(t)
    return p


def run(args: argparse.Namespace) -> int:
    if args.loramoe_command != "train":  # argparse enforces it; kept for clarity
        raise BadInputError(f"unknown loramoe command {args.loramoe_command!r}")
    from moe_unlearn.loramoe.config import LoRAMoEConfig
    from moe_unlearn.loramoe.finetune import FinetuneConfig, finetune, load_finetune_records

    lbc_weight = args.lbc_weight if args.lbc_weight is not None else (0.1 if args.groups else 0.0)
    adapter = LoRAMoEConfig(
        num_experts=args.experts, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=args.targets, router=args.router, top_k=args.top_k, groups=args.groups,
        group_types=args.group_types, lbc_delta=args.lbc_delta, lbc_weight=lbc_weight,
        lbc_convention=args.lbc_convention)
    config = FinetuneConfig(
        method=args.method, adapter=adapter, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress)
    config.adapter_config()  # bad knobs fail here, before the model is read
    if args.steps < 1 or args.batch_size < 1 or args.max_length < 2:
        raise BadInputError("--steps and --batch-size must be >= 1 and --max-length >= 2")
    from moe_unlearn.atomic import check_out_dir
    from moe_unlearn.loading import check_model_dir

    config.train_config(None).validate()  # lr, steps, ... before the model is read
    model_dir = check_model_dir(args.model, trust_remote_code=args.trust_remote_code)
    out = check_out_dir(args.out, model_dirs=(model_dir,), must_be_empty=not args.resume)
    records = load_finetune_records(args.data)
    model, tokenizer = load_from_args(args)  # --device (default: cuda if available) / --device-map / --dtype
    result = finetune(model, tokenizer, records, config, out_dir=out)
    final = {k: round(v, 4) for k, v in result.history.final().items()}
    print(json.dumps({"out": str(result.out_dir), "method": args.method, "steps": result.history.steps[-1:],
                      "trainable_params": result.trainable_params, "final": final,
                      "routing_group_mass": result.routing}))
    return 0
