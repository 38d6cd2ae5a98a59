"""Does world knowledge survive fine-tuning? LoRAMoE+LBC vs plain LoRA vs full fine-tuning.

On the demo model (moe_unlearn.bench_model), every run fine-tunes a fresh copy for the same
number of steps and batch size on the same data: a new knowledge domain (ships with invented
names and question templates the model never saw, `demo_task.new_domain_facts`, type "task")
mixed with QA replay of a fraction of the retain facts (type "world", the LBC's second type).
Each method runs on a learning-rate grid of the same shape (its centre times --lr-grid) and
several seeds (adapter init, batch order, dropout; the data are fixed). Reported per run:
- retention: of the held original facts (retain not replayed + forget + neighbor) the model
  answered exactly before, the fraction it still answers exactly after;
- task_em: exact match on the new domain's questions (knowledge injection: the trained ones);
- wall time of the fine-tuning and trainable parameters.
Selection, per method, on the seed means of each learning rate: among the learning rates whose
mean retention is at least --retention-floor (all of them if none is), the ones whose mean task_em
is within --tie of the best; of those, the one with the highest mean retention.

Methods: loramoe (E experts, groups world/task, LBC), lora (one expert, no router, same targets
and rank), full (every weight); ablations: loramoe_nolbc (LBC weight 0) and lora_wide (one expert
of rank E*r: the trainable parameters of loramoe, routers aside). The demo model's FFNs are all
routed experts (fused 3-D parameters, no nn.Linear), so the adapters wrap q/k/v/o_proj.
Results go to benchmarks/results/loramoe_retention_<device type>.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loramoe_retention.py            # ~5 min on a CPU
    .venv/bin/python benchmarks/bench_loramoe_retention.py --seeds 0 --methods loramoe,lora,full

--setting matched --model dense|moe is LoRAMoE's own question (with much instruction data, full
fine-tuning damages world knowledge; LoRAMoE keeps it) asked at matched task accuracy. The base model
knows the facts world: --model dense is a 4-layer LLaMA (0.5M parameters, `dense_matched_config`, built
through the shared loop and cached), --model moe the shipped bench MoE ("natural", Qwen2-MoE, 1.9M
parameters). The fine-tuning data: 3,000 records of three word tasks (`demo_task.word_task_records`:
first / last word of a list, swap two words; the words are the facts' answer words, no record states a
fact), type "task", plus QA replay of a quarter of the trained facts (type "world") repeated to a 10%
share. World-knowledge EM is measured on the other three quarters (never in the fine-tuning data).
Adapters wrap gate/up/down_proj and q/k/v/o_proj: on the MoE these are the shared expert and attention
(its routed experts are fused 3-D tensors, which LoRAMoE cannot wrap), through `finetune`, the code
`moe-unlearn loramoe train` runs. Methods (`MATCHED_METHODS`): full, lora (one LoRA of rank E*r),
loramoe_nolbc, loramoe_divide and loramoe_official (LBC weight 0.1 in the two conventions),
loramoe_topk (top-2 router, LBC divide). Tuning (seed 0, the task validation split only; the test split
and the world facts never enter): full fine-tuning's lr grid sets the target, --match x its best
validation accuracy; per method the cheapest grid point (fewest steps, smallest lr) reaching it; a method
that misses gets one more round at twice the steps. Then --seeds at the chosen point: task test
accuracy, world-knowledge EM, router group mass by data type per layer group before and after training,
step time (and its ratio to lora's). Each finished run is written to
benchmarks/results/loramoe_matched_<model>.json at once and skipped on a rerun (resumable).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loramoe_retention.py --setting matched --model dense
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loramoe_retention.py --setting matched --model moe
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import moe_unlearn
from moe_unlearn.bench_model import BenchModelConfig, FactsConfig, load_or_build
from moe_unlearn.bench_model.dense import DenseBenchConfig, load_or_build_dense, world_facts
from moe_unlearn.loading import load_model
from moe_unlearn.loramoe.config import FFN_TARGETS, LoRAMoEConfig
from moe_unlearn.loramoe.demo_task import (
    WORD_TASKS,
    fact_records,
    new_domain_facts,
    prompt_response_hits,
    word_task_records,
)
from moe_unlearn.loramoe.finetune import FinetuneConfig, encode_records, finetune, make_batches
from moe_unlearn.loramoe.model import add_loramoe
from moe_unlearn.loramoe.observe import observe_routing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("loramoe", "lora", "full", "loramoe_nolbc", "lora_wide")
MATCHED_METHODS = ("full", "lora", "loramoe_divide", "loramoe_nolbc", "loramoe_official", "loramoe_topk")
# per setting: steps, batch size, adapter / full lr grid centre, default methods
SETTING_DEFAULTS = {"moe": dict(steps=300, batch_size=16, lr_adapter=5e-4, lr_full=5e-5, methods=METHODS),
                    "matched": dict(steps=None, batch_size=16, lr_adapter=None, lr_full=None, methods=MATCHED_METHODS)}


def bench_config(name: str) -> BenchModelConfig:
    if name == "quick":
        return BenchModelConfig.quick()
    if name == "small":  # between quick and default: knows its facts, builds in under a minute on a CPU
        return BenchModelConfig(name="facts-moe-small",
                                facts=FactsConfig(entities_per_domain=12, neighbor_entities=4, holdout_entities=6),
                                vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                num_experts=4, moe_intermediate_size=64, steps=500, batch_size=32, lr=3e-3,
                                warmup_steps=20, extra_steps=200, extra_rounds=2)
    return BenchModelConfig()


def method_config(method: str, lr: float, seed: int, args: argparse.Namespace) -> FinetuneConfig:
    common = dict(steps=args.steps, batch_size=args.batch_size, max_length=64, seed=seed, progress=False, lr=lr)
    adapter = dict(target_modules=ATTENTION, rank=args.rank, alpha=args.alpha, dropout=0.05)
    if method in ("loramoe", "loramoe_nolbc"):
        half = args.experts // 2
        return FinetuneConfig(**common, method="loramoe", adapter=LoRAMoEConfig(
            **adapter, num_experts=args.experts, groups=[half, args.experts - half], group_types=["world", "task"],
            lbc_delta=0.1, lbc_convention=args.convention, lbc_weight=args.lbc_weight if method == "loramoe" else 0.0))
    if method == "lora_wide":
        return FinetuneConfig(**common, method="lora", adapter=LoRAMoEConfig(**{**adapter, "rank": args.rank * args.experts}))
    return FinetuneConfig(**common, method=method, adapter=LoRAMoEConfig(**adapter))


def select(per_lr: dict[str, dict], floor: float, tie: float) -> str:
    """The learning rate (key) chosen by the rule in the module docstring."""
    ok = [k for k, v in per_lr.items() if v["retention_mean"] >= floor] or list(per_lr)
    best = max(per_lr[k]["task_em_mean"] for k in ok)
    near = [k for k in ok if per_lr[k]["task_em_mean"] >= best - tie]
    return max(near, key=lambda k: (per_lr[k]["retention_mean"], per_lr[k]["task_em_mean"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=tuple(SETTING_DEFAULTS), default="moe",
                    help="moe: knowledge injection on the demo MoE, attention adapters; matched: see the docstring")
    ap.add_argument("--model", choices=tuple(MATCHED_DEFAULTS), default="dense", help="matched only: base model")
    ap.add_argument("--bench", choices=("quick", "small", "default"), default="small", help="moe setting only")
    ap.add_argument("--methods", default=None, help="default: every method of the setting")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--new-entities", type=int, default=24, help="ships of the new domain (4 facts each)")
    ap.add_argument("--replay", type=float, default=0.25, help="fraction of retain facts replayed as 'world' data")
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lbc-weight", type=float, default=0.1)
    ap.add_argument("--convention", choices=("divide", "official"), default="divide")
    ap.add_argument("--lr-adapter", type=float, default=None, help="grid centre of the adapter methods")
    ap.add_argument("--lr-full", type=float, default=None, help="grid centre of full fine-tuning")
    ap.add_argument("--lr-grid", default="0.5,1,2", help="multipliers of the centre; the same for every method")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--retention-floor", type=float, default=0.5)
    ap.add_argument("--tie", type=float, default=0.02)
    ap.add_argument("--task-train", type=int, default=3000, help="matched: task records trained on")
    ap.add_argument("--task-val", type=int, default=300, help="matched: task validation records (tuning)")
    ap.add_argument("--task-test", type=int, default=300, help="matched: task test records (reported)")
    ap.add_argument("--world-share", type=float, default=0.1,
                    help="matched: share of world-type (fact QA replay) records in the training mix")
    ap.add_argument("--match", type=float, default=0.95,
                    help="matched: the validation task accuracy to reach, as a share of full fine-tuning's best")
    ap.add_argument("--no-retry", dest="retry", action="store_false",
                    help="matched: no second round at twice the steps for a method that misses the target")
    ap.add_argument("--seed-unmatched", action="store_true",
                    help="matched: run every seed also for a method that missed the target (default: seed 0 only)")
    ap.add_argument("--lrs-full", default=None, help="matched: full fine-tuning's lr grid, comma-separated")
    ap.add_argument("--lrs-adapter", default=None, help="matched: the adapter methods' lr grid")
    ap.add_argument("--plot", default=None, metavar="JSON",
                    help="matched: only add the step-time ratios to a (possibly stopped) result JSON and draw its plot")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/loramoe_retention_<dev>.json)")
    args = ap.parse_args(argv)
    if args.plot:  # a stopped run: its derived step-time ratios, then the figure
        payload = json.loads(Path(args.plot).read_text())
        add_step_ratios(payload["summary"])
        _write(Path(args.plot), payload)
        print(f"wrote {plot_matched(payload, Path(args.plot).with_suffix('.png'))}")
        return 0
    defaults = SETTING_DEFAULTS[args.setting]
    if args.setting == "matched":
        md = MATCHED_DEFAULTS[args.model]
        args.steps = args.steps or md["steps"]
        args.lrs_full = [float(x) for x in args.lrs_full.split(",")] if args.lrs_full else list(md["lrs_full"])
        args.lrs_adapter = ([float(x) for x in args.lrs_adapter.split(",")] if args.lrs_adapter
                            else list(md["lrs_adapter"]))
    for key in ("steps", "batch_size", "lr_adapter", "lr_full"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.methods is None:
        args.methods = ",".join(defaults["methods"])
    device = torch.device(args.device)
    methods = args.methods.split(",")
    known = METHODS if args.setting == "moe" else MATCHED_METHODS
    unknown = sorted(set(methods) - set(known))
    if unknown:
        ap.error(f"unknown method(s) {unknown} for --setting {args.setting}; known: {','.join(known)}")
    grid = [float(m) for m in args.lr_grid.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.setting == "matched":
        return run_matched(args, methods, seeds, device)

    t0 = time.perf_counter()
    bench = load_or_build(bench_config(args.bench), progress=True)
    build_s = time.perf_counter() - t0
    tok = bench.tokenizer
    facts = bench.facts
    task_facts = new_domain_facts(facts.trained + facts.holdout, args.new_entities, seed=args.data_seed + 1)
    task = fact_records(task_facts, type_label="task")
    rng = random.Random(args.data_seed)
    retain = facts.retain_train + facts.utility  # every trained fact outside forget / neighbor
    replayed = set(rng.sample(range(len(retain)), int(args.replay * len(retain))))
    world = fact_records([retain[i] for i in sorted(replayed)], type_label="world")
    held = fact_records([f for i, f in enumerate(retain) if i not in replayed] + facts.forget + facts.neighbor)
    train_records = task + world
    random.Random(args.data_seed + 2).shuffle(train_records)

    base = bench.model.to(device)
    known_before = prompt_response_hits(base, tok, held)
    known_ids = [i for i, k in enumerate(known_before) if k]
    base_task = prompt_response_hits(base, tok, task)
    print(f"base: knows {len(known_ids)}/{len(held)} held facts, new-domain EM {sum(base_task) / len(task):.3f}")

    runs = []
    for method in methods:
        centre = args.lr_full if method == "full" else args.lr_adapter
        for mult in grid:
            for seed in seeds:
                model = load_model(bench.path, device=device)
                cfg = method_config(method, centre * mult, seed, args)
                t = time.perf_counter()
                res = finetune(model, tok, train_records, cfg)
                wall = time.perf_counter() - t
                hits = prompt_response_hits(model, tok, held)
                task_hits = prompt_response_hits(model, tok, task)
                world_hits = prompt_response_hits(model, tok, world)
                run = {"method": method, "lr": cfg.lr, "seed": seed,
                       "retention": sum(hits[i] for i in known_ids) / max(1, len(known_ids)),
                       "task_em": sum(task_hits) / len(task_hits),
                       "replayed_fact_em": sum(world_hits) / len(world_hits),
                       "final_terms": res.history.final(), "trainable_params": res.trainable_params,
                       "train_seconds": round(wall, 2), "routing_group_mass": res.routing}
                runs.append(run)
                print(f"{method:14s} lr={cfg.lr:.2e} seed={seed} retention={run['retention']:.3f} "
                      f"task_em={run['task_em']:.3f} replay_em={run['replayed_fact_em']:.3f} {wall:.1f}s", flush=True)

    summary: dict[str, dict] = {}
    for method in methods:
        per_lr: dict[str, dict] = {}
        for lr in sorted({r["lr"] for r in runs if r["method"] == method}):
            rs = [r for r in runs if r["method"] == method and r["lr"] == lr]
            ret, em = [r["retention"] for r in rs], [r["task_em"] for r in rs]
            per_lr[f"{lr:.2e}"] = {"lr": lr, "seeds": len(rs), "retention_mean": statistics.fmean(ret),
                                   "retention_min": min(ret), "retention_max": max(ret),
                                   "task_em_mean": statistics.fmean(em), "task_em_min": min(em),
                                   "task_em_max": max(em),
                                   "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
                                   "trainable_params": rs[0]["trainable_params"]}
        chosen = select(per_lr, args.retention_floor, args.tie)
        summary[method] = {"chosen_lr": per_lr[chosen]["lr"], "chosen": per_lr[chosen], "per_lr": per_lr}
        c = per_lr[chosen]
        print(f"chosen {method:14s} lr={c['lr']:.2e} retention={c['retention_mean']:.3f} "
              f"[{c['retention_min']:.3f}, {c['retention_max']:.3f}] task_em={c['task_em_mean']:.3f} "
              f"[{c['task_em_min']:.3f}, {c['task_em_max']:.3f}]")

    out = Path(args.out) if args.out else RESULTS / f"loramoe_retention_{device.type}.json"
    payload = {**_header(device, args), "bench_model": args.bench,
               "bench_model_meta": {k: bench.meta.get(k) for k in ("digest", "exact_match", "steps")},
               "bench_build_seconds": round(build_s, 1), "args": vars(args),
               "selection_rule": (f"per method, on seed means per lr: among lrs with retention >= "
                                  f"{args.retention_floor} (all if none), those with task_em within {args.tie} "
                                  f"of the best; of those the highest retention"),
               "data": {"task_facts": len(task), "world_replay": len(world), "held_facts": len(held),
                        "known_before": len(known_ids), "base_task_em": sum(base_task) / len(task),
                        "task_example": task[0]},
               "summary": summary, "runs": runs}
    _write(out, payload)
    print(f"wrote {out}")
    return 0


def _header(device: torch.device, args: argparse.Namespace) -> dict:
    return {"benchmark": "loramoe_retention", "setting": args.setting, "device": device_name(device),
            "device_type": device.type, "torch_threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "moe_unlearn": moe_unlearn.__version__},
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _write(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)


# -- the matched comparison (--setting matched): every method tuned to full fine-tuning's task accuracy ------

# the bench MoE's FFNs are routed experts (fused 3-D tensors, no nn.Linear, so no adapter there): the adapters
# wrap its shared expert's linears and attention; the dense model gets the same set (its MLP and attention)
MATCHED_TARGETS = list(FFN_TARGETS) + ATTENTION
MATCHED_DEFAULTS = {  # per model: steps, lr grids (full; adapters); sized for a shared 2-core CPU
    "dense": dict(steps=300, lrs_full=(1e-3, 3e-3), lrs_adapter=(1e-3, 3e-3)),
    "moe": dict(steps=200, lrs_full=(3e-4, 1e-3), lrs_adapter=(1e-3, 3e-3)),
}
MATCHED_SPEC_KEYS = ("model", "steps", "batch_size", "experts", "rank", "alpha", "lbc_weight", "data_seed", "replay",
                     "task_train", "task_val", "task_test", "world_share", "match", "lrs_full", "lrs_adapter")


def dense_matched_config() -> DenseBenchConfig:
    """The dense model of the matched comparison: 4 layers, hidden 96 (about 0.6M parameters), close to the
    bench MoE's active parameters per token (6 layers, hidden 96, shared expert + 4 of 16 routed experts)."""
    return DenseBenchConfig(name="facts-dense-m", hidden_size=96, num_layers=4, intermediate_size=256, steps=900)


def matched_method_config(method: str, lr: float, steps: int, seed: int, args: argparse.Namespace) -> FinetuneConfig:
    """full; lora = one LoRA of rank E*r (the experts' parameters, routers aside); loramoe_* = E experts of rank
    r, two groups (world, task), dense router (topk: top-2) and the LBC off / divide / official convention."""
    common = dict(steps=steps, batch_size=args.batch_size, max_length=64, seed=seed, progress=False, lr=lr)
    adapter = dict(target_modules=MATCHED_TARGETS, rank=args.rank, alpha=args.alpha, dropout=0.05)
    if method == "full":
        return FinetuneConfig(**common, method="full", adapter=LoRAMoEConfig(**adapter))
    if method == "lora":
        return FinetuneConfig(**common, method="lora",
                              adapter=LoRAMoEConfig(**{**adapter, "rank": args.rank * args.experts}))
    variant = method.removeprefix("loramoe_")
    half = args.experts // 2
    return FinetuneConfig(**common, method="loramoe", adapter=LoRAMoEConfig(
        **adapter, num_experts=args.experts, groups=[half, args.experts - half], group_types=["world", "task"],
        lbc_delta=0.1, router="topk" if variant == "topk" else "dense", top_k=2,
        lbc_convention="official" if variant == "official" else "divide",
        lbc_weight=0.0 if variant == "nolbc" else args.lbc_weight))


def _routing_by_group(model, tok, named_records: dict[str, list[dict]], expert_group: list[int]) -> dict:
    """layer group ('q_proj', 'shared_expert_down_proj', ...) -> type -> [mass share per expert group], the mean
    over the group's layers, on up to 4 batches of 64 of each named record set; plus 'all' (every layer)."""
    from moe_unlearn.loramoe.observe import _layer_groups

    obs = None
    for label, recs in named_records.items():
        examples = encode_records([{**r, "type": label} for r in recs], tok, 64)
        batches = make_batches(examples, 64, tok.pad_token_id, seed=0, shuffle=False)(0)
        o = observe_routing(model, batches, max_batches=4)
        if obs is None:
            obs = o
        else:
            for layer, per in o.mass.items():
                obs.mass.setdefault(layer, {}).update(per)
                obs.tokens.setdefault(layer, {}).update(o.tokens[layer])
    per_layer = obs.group_mass(expert_group)
    out = {}
    for kind, layers in {**_layer_groups(list(per_layer)), "all": list(per_layer)}.items():
        types = per_layer[layers[0]]
        out[kind] = {t: [statistics.fmean(per_layer[la][t][g] for la in layers) for g in range(len(types[t]))]
                     for t in types}
    return out


def matched_choice(rows: list[dict], target: float) -> tuple[dict, bool]:
    """The cheapest (fewest steps, then smallest lr) tuning row whose validation task accuracy reaches
    `target` (True); else the row of best validation accuracy (False)."""
    ok = sorted((r for r in rows if r["task_val_acc"] >= target), key=lambda r: (r["steps"], r["lr"]))
    if ok:
        return ok[0], True
    return max(rows, key=lambda r: (r["task_val_acc"], -r["steps"], -r["lr"])), False


def run_matched(args: argparse.Namespace, methods: list[str], seeds: list[int], device: torch.device) -> int:
    """See the module docstring (--setting matched). Resumable: each finished (method, lr, steps, seed) run is
    written to the result JSON as it ends and skipped when found there."""
    out = Path(args.out) if args.out else RESULTS / f"loramoe_matched_{args.model}.json"
    spec = {k: getattr(args, k) for k in MATCHED_SPEC_KEYS}
    runs: list[dict] = []
    if out.is_file():
        old = json.loads(out.read_text())
        grids = ("lrs_full", "lrs_adapter")
        old_spec = dict(old.get("spec") or {})
        if {k: v for k, v in old_spec.items() if k not in grids} != {k: v for k, v in spec.items() if k not in grids}:
            raise SystemExit(f"{out} holds a run with another spec; pass --out for a new file or delete it")
        # A wider learning-rate grid resumes the same study: runs are keyed by lr, so the grid recorded is the union.
        for k in grids:
            spec[k] = sorted(set(spec[k]) | set(old_spec.get(k, [])))
            setattr(args, k, spec[k])
        runs = old.get("runs", [])
        print(f"resuming: {len(runs)} finished runs in {out}", flush=True)
    t0 = time.perf_counter()
    if args.model == "dense":
        bench = load_or_build_dense(dense_matched_config(), progress=False)
        world_all = world_facts(bench.facts)
    else:
        from moe_unlearn.bench_model.build import bench_config as named_config
        from moe_unlearn.bench_model.build import load_bench_model, shipped_path

        bench = load_bench_model(shipped_path(named_config("natural")))
        world_all = sorted(bench.facts.trained, key=lambda f: f.id)
    build_s = time.perf_counter() - t0
    tok = bench.tokenizer
    rng = random.Random(args.data_seed)
    replayed = set(rng.sample(range(len(world_all)), int(args.replay * len(world_all))))
    world = fact_records([world_all[i] for i in sorted(replayed)], type_label="world")
    held = fact_records([f for i, f in enumerate(world_all) if i not in replayed], type_label="held_world")
    seen: set = set()
    task_train = word_task_records(args.task_train, seed=args.data_seed, exclude=seen)
    task_val = word_task_records(args.task_val, seed=args.data_seed + 1, exclude=seen)
    task_test = word_task_records(args.task_test, seed=args.data_seed + 2, exclude=seen)
    copies = max(1, round(args.world_share * len(task_train) / ((1 - args.world_share) * len(world))))
    train_records = task_train + world * copies
    random.Random(args.data_seed + 3).shuffle(train_records)
    routing_sets = {"world": world, "task": task_train[:256], "held_world": held, "task_test": task_test}

    base = bench.model.to(device)
    held_before = prompt_response_hits(base, tok, held)
    known_ids = [i for i, k in enumerate(held_before) if k]
    base_val = sum(prompt_response_hits(base, tok, task_val)) / len(task_val)
    print(f"{args.model} base: knows {len(known_ids)}/{len(held)} held facts; task val acc {base_val:.3f}; "
          f"train mix {len(task_train)} task + {len(world)}x{copies} world", flush=True)
    summary: dict[str, dict] = {}

    def payload() -> dict:
        return {**_header(device, args), "benchmark": "loramoe_matched", "spec": spec, "args": vars(args),
                "model": {"kind": args.model, "path_name": bench.path.name,
                          "num_parameters": sum(p.numel() for p in base.parameters()),
                          **{k: bench.meta.get(k) for k in ("digest", "exact_match", "steps")}},
                "adapter_targets": MATCHED_TARGETS, "load_seconds": round(build_s, 1),
                "selection_rule": (f"tuning on seed {seeds[0]} and the task validation split only: full fine-tuning "
                                   f"runs its lr grid; target = {args.match} x its best validation accuracy; per "
                                   f"method the cheapest (fewest steps, then smallest lr) grid point reaching the "
                                   f"target (full included); a method that reaches it at no lr gets one more round "
                                   f"at 2x steps (unless --no-retry: retry={args.retry}); if still short, its best "
                                   f"point, flagged reached_target=false, with its tuning seed only unless --seed-unmatched"),
                "data": {"task_train": len(task_train), "task_val": len(task_val), "task_test": len(task_test),
                         "task_types": list(WORD_TASKS), "world_replay_facts": len(world), "world_copies": copies,
                         "world_share": len(world) * copies / len(train_records), "held_facts": len(held),
                         "known_before": len(known_ids), "base_task_val_acc": base_val,
                         "task_example": task_train[0]},
                "summary": summary, "runs": runs}

    def run(method: str, lr: float, steps: int, seed: int) -> dict:
        for r in runs:
            if (r["method"], r["lr"], r["steps"], r["seed"]) == (method, lr, steps, seed):
                return r
        cfg = matched_method_config(method, lr, steps, seed, args)
        adapter = cfg.adapter_config()
        routed = adapter is not None and adapter.router != "none"
        before = None
        if routed:  # the same init finetune makes (its seed, then add_loramoe), observed before any step
            model = load_model(bench.path, device=device)
            torch.manual_seed(seed)
            add_loramoe(model, adapter)
            before = _routing_by_group(model.eval(), tok, routing_sets, adapter.expert_group())
        model = load_model(bench.path, device=device)
        t = time.perf_counter()
        res = finetune(model, tok, train_records, cfg)
        wall = time.perf_counter() - t
        hits = prompt_response_hits(model, tok, held)
        r = {"method": method, "lr": lr, "steps": steps, "seed": seed,
             "world_em": sum(hits) / len(hits),
             "retention": sum(hits[i] for i in known_ids) / max(1, len(known_ids)),
             "task_val_acc": sum(prompt_response_hits(model, tok, task_val)) / len(task_val),
             "task_test_acc": sum(prompt_response_hits(model, tok, task_test)) / len(task_test),
             "replayed_fact_em": sum(prompt_response_hits(model, tok, world)) / len(world),
             "trainable_params": res.trainable_params, "train_seconds": round(wall, 2),
             "step_ms": round(1000 * wall / steps, 2), "final_terms": res.history.final(),
             "routing_before": before,
             "routing_after": _routing_by_group(model, tok, routing_sets, adapter.expert_group()) if routed else None}
        runs.append(r)
        _write(out, payload())
        print(f"{method:17s} lr={lr:.1e} steps={steps} seed={seed} world_em={r['world_em']:.3f} "
              f"val={r['task_val_acc']:.3f} test={r['task_test_acc']:.3f} {r['step_ms']:.0f} ms/step", flush=True)
        return r

    order = ["full"] + [m for m in methods if m != "full"]  # full first: it sets the target
    target = None
    for method in order:  # per method: tuning on seed 0 (validation split only), then every seed there
        lrs = args.lrs_full if method == "full" else args.lrs_adapter
        rows = [run(method, lr, args.steps, seeds[0]) for lr in lrs]
        if target is None:
            target = args.match * max(r["task_val_acc"] for r in rows)
        choice, reached = matched_choice(rows, target)
        if not reached and args.retry:  # one more round: twice the steps at every lr
            rows += [run(method, lr, 2 * args.steps, seeds[0]) for lr in lrs]
            choice, reached = matched_choice(rows, target)
        if method not in methods:
            continue
        summary[method] = {"method": method, "chosen": {"lr": choice["lr"], "steps": choice["steps"]},
                           "reached_target": reached, "target_val_acc": target,
                           "grid": [{k: r[k] for k in ("lr", "steps", "task_val_acc")} for r in rows]}
        # a method that missed the target has no matched point to compare: its best tuning run only
        used = seeds if reached or args.seed_unmatched else seeds[:1]
        rs = [run(method, choice["lr"], choice["steps"], s) for s in used]
        stat = {"seeds": used, "trainable_params": rs[0]["trainable_params"]}
        for key in ("task_test_acc", "world_em", "retention", "task_val_acc", "replayed_fact_em", "step_ms"):
            vals = [r[key] for r in rs]
            stat[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "per_seed": vals}
        stat["task_accuracy"] = stat["task_test_acc"]["mean"]
        stat["world_em_mean"] = stat["world_em"]["mean"]
        for when in ("routing_before", "routing_after"):
            if rs[0][when]:
                stat[when] = {kind: {t: [statistics.fmean(r[when][kind][t][g] for r in rs) for g in range(len(v))]
                                     for t, v in per.items()} for kind, per in rs[0][when].items()}
        summary[method].update(stat)
        _write(out, payload())
    add_step_ratios(summary)
    _write(out, payload())
    for m in summary.values():
        print(f"chosen {m['method']:17s} lr={m['chosen']['lr']:.1e} steps={m['chosen']['steps']} "
              f"reached={m['reached_target']} task={m['task_accuracy']:.3f} world_em={m['world_em_mean']:.3f} "
              f"step x{m.get('step_time_vs_lora', float('nan')):.2f}", flush=True)
    print(f"wrote {out} and {plot_matched(payload(), out.with_suffix('.png'))}")
    return 0


def add_step_ratios(summary: dict) -> None:
    """step_time_vs_lora of every finished method: its mean step time over lora's (same machine, same load)."""
    lora = summary.get("lora")
    if lora and "step_ms" in lora:
        for m in summary.values():
            if "step_ms" in m:
                m["step_time_vs_lora"] = m["step_ms"]["mean"] / lora["step_ms"]["mean"]


def plot_matched(payload: dict, path: Path) -> Path:
    """Left: world-knowledge EM against test task accuracy, every run (o = chosen point, x = tuning points).
    Right: router mass on the world group by data type, before / after training, per LoRAMoE variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary = payload["runs"], payload.get("summary") or {}
    methods = [m for m in MATCHED_METHODS if any(r["method"] == m for r in runs)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, m in enumerate(methods):
        c = (summary.get(m) or {}).get("chosen") or {}
        rs = [r for r in runs if r["method"] == m]
        for r in rs:
            filled = (r["lr"], r["steps"]) == (c.get("lr"), c.get("steps"))
            ax.scatter(r["task_test_acc"], r["world_em"], color=f"C{i}", marker="o" if filled else "x",
                       label=m if r is rs[0] else None, alpha=0.85)
    ax.set_xlabel("task accuracy (test split)")
    ax.set_ylabel("world-knowledge EM (facts never in the task data)")
    ax.set_title(f"{payload['model']['kind']} model (o = chosen, x = tuning grid)")
    ax.legend(fontsize=7)
    types = ["world", "task", "held_world", "task_test"]
    variants = [m for m in methods if m.startswith("loramoe") and (summary.get(m) or {}).get("routing_after")]
    width = 0.8 / max(1, 2 * len(variants))
    k, shown = 0, [0.5]
    for m in variants:
        for when, hatch in (("routing_before", "//"), ("routing_after", None)):
            vals = [summary[m][when]["all"][t][0] for t in types]
            bx.bar([x + k * width for x in range(len(types))], vals, width, color=f"C{methods.index(m)}",
                   hatch=hatch, alpha=0.5 if hatch else 1.0, label=f"{m} {when.split('_')[1]}")
            shown += vals
            k += 1
    bx.set_ylim(min(shown) - 0.03, max(shown) + 0.03)  # the separation is a few points: zoom on it
    bx.axhline(0.5, color="grey", lw=0.8, ls="--")
    bx.set_xticks([x + width * (k - 1) / 2 for x in range(len(types))], types)
    bx.set_ylabel("router mass on the world group (all layers)")
    bx.set_title("routing by data type (hatched = before training)")
    bx.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
