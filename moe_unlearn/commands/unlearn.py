"""`moe-unlearn unlearn`: unlearn a forget set from a local MoE model and write a patch.

Writes OUT/patch.safetensors + OUT/patch.json (or, with --merge, a whole model saved with
save_pretrained into OUT). OUT must be new or empty and must not be the model directory.

The run's options are an `UnlearnConfig`: flags, or `--config run.yaml|run.json` (a mapping of
its field names, plus model / forget / retain), flags overriding the file. patch.json stores
the config and the data paths, so `moe-unlearn unlearn --config OLD/patch.json --out NEW`
replays a run. Under `torchrun` / `accelerate launch` it runs data parallel (rank 0 writes), or
with --shard fsdp2 (or an accelerate FSDP config) each rank stores a shard of every layer.
"""

from __future__ import annotations

import argparse
import json

from moe_unlearn.commands import add_model_args, load_from_args
from moe_unlearn.unlearning.config import UnlearnConfig, read_run_file
from moe_unlearn.validate import MAX_RANKS, check_int, env_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("unlearn", help="unlearn a forget set; write a reversible patch",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # every option defaults to None = "not given": the --config file's value, else UnlearnConfig's default
    p.add_argument("--config", default=None, help="run options (.yaml/.json, or a patch.json to replay)")
    p.add_argument("--model", default=None, help="local model directory (save_pretrained layout, with tokenizer)")
    p.add_argument("--forget", default=None, help=".txt (one document per line), .jsonl, or a save_to_disk dir")
    p.add_argument("--retain", default=None, help="retain data (same formats); needed by graddiff")
    p.add_argument("--target", action="append", default=None, metavar="L:E",
                   help="target expert LAYER:EXPERT (repeat for topm; 'L:shared' needs --allow-shared)")
    p.add_argument("--attribution", default=None, help="attribution.json from `moe-unlearn attribute` "
                                                      "(used when --target is not given)")
    p.add_argument("--out", default=None, help="new (or empty) output directory")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="method hyperparameter, e.g. --set beta=0.1 --set retain_loss=kl")
    p.add_argument("--no-prefix-cache", action="store_true", default=None, help="run the whole model every step")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plan", action="store_true",
                   help="print the per-rank memory estimate computed from the model's config.json (no weights "
                        "loaded, nothing written) and exit; with --shard fsdp2 --nproc N for N ranks")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="--plan: the number of ranks (default: WORLD_SIZE, else 1)")
    p.add_argument("--no-knowledge-check", action="store_true",
                   help="skip the check, before training, that zeroing the target experts removes the forget "
                        "knowledge (three forward passes over 64 forget and 64 retain records)")
    p.add_argument("--chat-template", dest="template", action="store_const", const="chat", default=None,
                   help="render QA records with the tokenizer's chat template (same as --template chat)")
    add_config_flags(p)
    add_model_args(p)
    return p


_TYPES = {"int": int, "float": float, "str": str}


def add_config_flags(p: argparse.ArgumentParser) -> list[str]:
    """One flag per `UnlearnConfig` field whose Option has cli=True (--top-m for top_m; bools are
    switches); returns the field names. Each defaults to None: not given."""
    names = []
    for name, opt in UnlearnConfig.options().items():
        if not opt.cli:
            continue
        flag = "--" + name.replace("_", "-")
        if opt.kind == "bool":
            p.add_argument(flag, action="store_true", default=None, help=opt.help)
        else:
            choices = list(opt.choices()) if opt.choices is not None else None
            p.add_argument(flag, type=_TYPES[opt.kind], default=None, choices=choices, help=opt.help)
        names.append(name)
    return names


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


def build_config(args: argparse.Namespace):
    """(UnlearnConfig, model dir, forget, retain) from the --config file and the flags (flags win)."""
    from moe_unlearn.errors import BadInputError
    from moe_unlearn.unlearning.config import read_run_file
    from moe_unlearn.unlearning.scopes import SCOPES

    if args.target and args.attribution:
        raise BadInputError("give --target or --attribution, not both")
    opts = read_run_file(args.config) if args.config else {}
    paths = {k: opts.pop(k, None) for k in ("model", "forget", "retain")}
    for k in ("progress", "out_dir", "model_dir", "checkpoint_dir"):  # where things go is this run's choice
        opts.pop(k, None)
    cfg = UnlearnConfig.from_dict(opts)
    flags = [k for k, o in UnlearnConfig.options().items() if o.cli]  # what add_config_flags added
    given = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    if args.epochs is not None and args.steps is None:
        given["steps"] = None
    elif args.steps is not None and args.epochs is None:
        given["epochs"] = None
    if args.target is not None:
        given["target"] = args.target
    elif args.attribution:
        from moe_unlearn.attribution import Attribution

        given["target"] = Attribution.from_json(args.attribution)
    if args.set:
        given["method_kwargs"] = {**cfg.method_kwargs, **_parse_sets(args.set)}
    if args.no_prefix_cache:
        given["prefix_cache"] = False
    if given.get("template"):
        given["template"] = given["template"].replace("\\n", "\n")  # a new line typed as \n
    model = args.model or paths["model"]
    forget = args.forget or paths["forget"]
    retain = args.retain or paths["retain"]
    missing = [flag for flag, v in (("--model", model), ("--forget", forget), ("--out", args.out)) if not v]
    if missing:
        raise BadInputError(f"{', '.join(missing)} required (as flags, or model/forget in --config)")
    cfg = UnlearnConfig.build(cfg, **given, out_dir=args.out, model_dir=model, progress=not args.quiet)
    if args.top_m is not None and not SCOPES.lookup(cfg.scope).picks_several:
        raise BadInputError(f"--top-m is only read by --scope topm (got --scope {cfg.scope})")
    return cfg, model, forget, retain


def check_inputs(args: argparse.Namespace, cfg, model_dir: str, forget: str, retain: str | None):
    """Every check that needs no model, before the (slow) model load: a typo costs nothing and writes
    nothing. Returns the checked model directory."""
    from moe_unlearn.data import load_texts
    from moe_unlearn.loading import check_model_dir, parse_device_map, parse_dtype, resolve_device
    from moe_unlearn.unlearning.checks import check_unlearn_config

    mdir = check_model_dir(model_dir, trust_remote_code=args.trust_remote_code)
    check_unlearn_config(cfg, has_retain=retain is not None, model_dir=mdir.resolve())
    resolve_device(args.device)
    parse_device_map(args.device_map)
    parse_dtype(args.dtype)
    for source in (forget, retain):  # read once to check (the engine reads them again, cheaply)
        if source is not None:
            load_texts(source, field=cfg.field, template=None if cfg.template == "chat" else cfg.template)
    return mdir


def print_plan(args: argparse.Namespace) -> int:
    """--plan: the memory per rank of a uoe / topm run, from the config alone (moe_unlearn.memory)."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig

    from moe_unlearn.arch.target import ExpertTarget
    from moe_unlearn.errors import BadInputError
    from moe_unlearn.loading import parse_dtype
    from moe_unlearn.memory import estimate, meta_model

    model_dir = args.model or (read_run_file(args.config).get("model") if args.config else None)
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        raise BadInputError("--plan needs --model DIR holding a config.json (the weights are not read)")
    if (args.scope or "uoe") not in ("uoe", "topm"):
        raise BadInputError(f"--plan estimates uoe / topm runs (one or a few target experts), got --scope {args.scope}")
    nproc = args.nproc if args.nproc is not None else env_int("WORLD_SIZE", 1, low=1)
    check_int("--nproc", nproc, low=1, high=MAX_RANKS)
    shard = args.shard
    if shard is not None and nproc < 2:
        raise BadInputError(f"--shard {shard} shards over several ranks: give --nproc N (N >= 2)")
    targets = [tuple(ExpertTarget.parse(t)) for t in args.target or []]
    if any(isinstance(e, str) for _, e in targets):
        raise BadInputError("--plan estimates routed-expert targets (L:E), not shared experts")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{model_dir}/config.json cannot be read: {' '.join(str(exc).split())[:200]}") from None
    dtype = parse_dtype(args.dtype)
    model = meta_model(config, dtype if isinstance(dtype, torch.dtype) else None)
    print(estimate(model, [(int(ly), int(e)) for ly, e in targets], world_size=nproc, shard=shard).report())
    return 0


def launch_sharding(args: argparse.Namespace, cfg) -> None:
    """--shard, else what an accelerate launcher's config asks for (FSDP -> fsdp2, DeepSpeed refused);
    refused before loading: sharding without several processes, a device map with several."""

    from moe_unlearn.sharding import check_launch, shard_from_launcher

    if cfg.shard is None:
        cfg.shard = shard_from_launcher()
    check_launch(cfg.shard, args.device_map, env_int("WORLD_SIZE", 1, low=1))


def check_knowledge(cfg, model, tokenizer, forget, retain) -> None:
    """Warn (PremiseWarning) when the chosen routed experts do not hold the forget knowledge: zeroing
    them should remove the forget answers (EM; NLL for plain texts) selectively against the retain data.
    Routing statistics alone cannot tell this: an expert can receive every forget token yet store none of
    the facts, and unlearning it then hides the facts by re-routing instead of erasing them. Runs only when
    the targets are given (--target / --attribution) and retain data are, on one unsharded model."""
    import warnings

    from moe_unlearn.attribution import PremiseWarning
    from moe_unlearn.locate import knowledge_check
    from moe_unlearn.unlearning.scopes import SCOPES
    from moe_unlearn.unlearning.targets import choose_targets

    if retain is None or cfg.target is None or cfg.shard or not SCOPES.lookup(cfg.scope).reads_targets:
        return
    pairs = [(t.layer, int(t.expert)) for t in choose_targets(cfg, model, forget, retain, tokenizer) if not t.shared]
    if not pairs:
        return
    kc = knowledge_check(model, tokenizer, forget, retain, pairs)
    if not kc.holds:
        warnings.warn(kc.not_held_message(pairs, " (utility: the retain data; --no-knowledge-check skips this)"),
                      PremiseWarning, stacklevel=2)


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.distributed import init_from_env, is_main
    from moe_unlearn.unlearning import unlearn

    if args.plan:
        return print_plan(args)
    cfg, model_dir, forget, retain = build_config(args)  # bad options fail before the model is read
    check_inputs(args, cfg, model_dir, forget, retain)
    launch_sharding(args, cfg)
    keep = ()
    if cfg.shard:  # each rank reads its share of the weights, the tensors the run trains whole (from the config)
        from moe_unlearn.loading import load_model, parse_dtype
        from moe_unlearn.unlearning.engine import trained_names

        keep = trained_names(load_model(model_dir, trust_remote_code=args.trust_remote_code, meta=True,
                                        dtype=parse_dtype(args.dtype)), cfg)
    init_from_env(args.device)  # under torchrun / accelerate launch: data parallel over the ranks
    if cfg.shard and args.device is None:  # fully_shard moves each rank's shards to its GPU
        args.device = "cpu"
    args.model = model_dir
    model, tokenizer = load_from_args(args, shard=cfg.shard, keep=keep)
    if not args.no_knowledge_check and is_main():
        check_knowledge(cfg, model, tokenizer, forget, retain)
    res = unlearn(model, forget, retain, tokenizer=tokenizer, config=cfg)
    if not is_main():
        return 0
    where = res.merged_path or res.patch_path
    terms = ", ".join(f"{k}={v:.4g}" for k, v in res.final_terms.items())
    print(f"unlearned {cfg.method}/{cfg.scope} targets={res.targets or '-'} "
          f"trainable={res.trainable_params} steps={len(res.history.steps)} in {res.wall_time:.1f}s")
    print(f"final: {terms}")
    print(f"wrote {where}")
    return 0
