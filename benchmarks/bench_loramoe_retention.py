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

--setting dense is LoRAMoE's own setting (the paper's claim: with much instruction data, full
fine-tuning damages world knowledge and LoRAMoE keeps it). A small dense LLaMA-style model
(moe_unlearn.bench_model.dense) knows the facts; the fine-tuning data are many records of three
rule tasks that need no world knowledge (`demo_task.instruction_task_records`, type "task") plus a
share of QA replay of trained facts (type "world"); adapters wrap the FFN linears
(gate/up/down_proj). Methods: loramoe (E=6, r=4, alpha 32, two groups of 3, LBC delta 0.1, weight
0.1), lora_wide (one LoRA of rank E*r: equal parameters, routers aside), full, loramoe_nolbc.
Matched task accuracy: each method runs its lr grid with seed 0; the rule picks, per method, the
smallest lr whose accuracy on a validation split of the task data (inputs never trained, never the
world-knowledge evaluation) reaches --task-target, or the lr of best validation accuracy if none
does; the other seeds then run at that lr. Reported: retention of the held facts (trained facts
not replayed, known before), task accuracy on a test split, and the router mass per group by data
type (training task / world data, held world questions, task test inputs). The run is resumable:
finished runs recorded in the JSON are skipped (the JSON is rewritten after every run).

    nice -n 10 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_loramoe_retention.py --setting dense
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
    fact_records,
    instruction_task_records,
    new_domain_facts,
    prompt_response_hits,
)
from moe_unlearn.loramoe.finetune import FinetuneConfig, encode_records, finetune, make_batches
from moe_unlearn.loramoe.observe import observe_routing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("loramoe", "lora", "full", "loramoe_nolbc", "lora_wide")
DENSE_METHODS = ("loramoe", "lora_wide", "full", "loramoe_nolbc")
# per setting: steps, batch size, adapter / full lr grid centre, default methods
SETTING_DEFAULTS = {"moe": dict(steps=300, batch_size=16, lr_adapter=5e-4, lr_full=5e-5, methods=METHODS),
                    "dense": dict(steps=200, batch_size=16, lr_adapter=4e-3, lr_full=6e-4, methods=DENSE_METHODS)}


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
    targets = list(FFN_TARGETS) if args.setting == "dense" else ATTENTION
    adapter = dict(target_modules=targets, rank=args.rank, alpha=args.alpha, dropout=0.05)
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
                    help="moe: the MoE bench model, attention adapters; dense: LoRAMoE's own setting (FFN adapters)")
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
    ap.add_argument("--task-train", type=int, default=3000, help="dense: task records trained on")
    ap.add_argument("--task-val", type=int, default=300, help="dense: task validation records (lr choice)")
    ap.add_argument("--task-test", type=int, default=300, help="dense: task test records (reported)")
    ap.add_argument("--world-share", type=float, default=0.1,
                    help="dense: share of world-type (fact QA replay) records in the training mix")
    ap.add_argument("--task-target", type=float, default=0.9,
                    help="dense: validation task accuracy an lr must reach to be chosen (smallest such lr)")
    ap.add_argument("--plot", default=None, metavar="JSON",
                    help="dense: only draw the plot of a (possibly partial) result JSON, beside it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/loramoe_retention_<dev>.json)")
    args = ap.parse_args(argv)
    if args.plot:
        print(f"wrote {plot_dense(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix('.png'))}")
        return 0
    defaults = SETTING_DEFAULTS[args.setting]
    for key in ("steps", "batch_size", "lr_adapter", "lr_full"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.methods is None:
        args.methods = ",".join(defaults["methods"])
    device = torch.device(args.device)
    methods = args.methods.split(",")
    known = METHODS if args.setting == "moe" else DENSE_METHODS
    unknown = sorted(set(methods) - set(known))
    if unknown:
        ap.error(f"unknown method(s) {unknown} for --setting {args.setting}; known: {','.join(known)}")
    grid = [float(m) for m in args.lr_grid.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.setting == "dense":
        return run_dense(args, methods, grid, seeds, device)

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


DENSE_SPEC_KEYS = ("steps", "batch_size", "experts", "rank", "alpha", "lbc_weight", "convention", "lr_adapter",
                   "lr_full", "lr_grid", "data_seed", "replay", "task_train", "task_val", "task_test",
                   "world_share", "task_target")


def _routing_by_type(model, tok, named_records: dict[str, list[dict]], expert_group: list[int]) -> dict:
    """type -> [group mass share], over (up to 8 batches of) each named record set."""
    out = {}
    for label, recs in named_records.items():
        examples = encode_records([{**r, "type": label} for r in recs], tok, 64)
        batches = make_batches(examples, 64, tok.pad_token_id, seed=0, shuffle=False)(0)
        out.update(observe_routing(model, batches, max_batches=8).summary(expert_group))
    return out


def choose_dense_lr(seed0: dict[float, dict], target: float) -> tuple[float, bool]:
    """The smallest lr whose validation task accuracy reaches `target` (True), else the best one (False)."""
    ok = sorted(lr for lr, r in seed0.items() if r["task_val_acc"] >= target)
    if ok:
        return ok[0], True
    return max(seed0, key=lambda lr: (seed0[lr]["task_val_acc"], -lr)), False


def run_dense(args: argparse.Namespace, methods: list[str], grid: list[float], seeds: list[int],
              device: torch.device) -> int:
    """LoRAMoE's own setting; see the module docstring. Resumable through the result JSON."""
    out = Path(args.out) if args.out else RESULTS / f"loramoe_retention_dense_{device.type}.json"
    spec = {k: getattr(args, k) for k in DENSE_SPEC_KEYS}
    runs: list[dict] = []
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("spec") == spec:
            runs = old.get("runs", [])
            print(f"resuming: {len(runs)} finished runs in {out}")
        else:
            raise SystemExit(f"{out} holds a run with another spec; pass --out for a new file or delete it")
    t0 = time.perf_counter()
    bench = load_or_build_dense(DenseBenchConfig(), progress=False)
    build_s = time.perf_counter() - t0
    tok, facts = bench.tokenizer, bench.facts
    trained = world_facts(facts)
    rng = random.Random(args.data_seed)
    replayed = set(rng.sample(range(len(trained)), int(args.replay * len(trained))))
    world = fact_records([trained[i] for i in sorted(replayed)], type_label="world")
    held = fact_records([f for i, f in enumerate(trained) if i not in replayed], type_label="held_world")
    seen: set = set()
    task_train = instruction_task_records(args.task_train, seed=args.data_seed, exclude=seen)
    task_val = instruction_task_records(args.task_val, seed=args.data_seed + 1, exclude=seen)
    task_test = instruction_task_records(args.task_test, seed=args.data_seed + 2, exclude=seen)
    copies = max(1, round(args.world_share * len(task_train) / ((1 - args.world_share) * len(world))))
    train_records = task_train + world * copies
    random.Random(args.data_seed + 3).shuffle(train_records)

    base = bench.model.to(device)
    known_ids = [i for i, k in enumerate(prompt_response_hits(base, tok, held)) if k]
    base_val = sum(prompt_response_hits(base, tok, task_val)) / len(task_val)
    print(f"dense base: knows {len(known_ids)}/{len(held)} held facts; task val acc {base_val:.3f}; "
          f"train mix {len(task_train)} task + {len(world)}x{copies} world")

    def payload(summary: dict) -> dict:
        return {**_header(device, args), "spec": spec, "args": vars(args),
                "bench_model": {"path_name": bench.path.name, **{k: bench.meta.get(k) for k in
                                ("digest", "exact_match", "steps", "num_parameters", "train_seconds")}},
                "bench_build_seconds": round(build_s, 1),
                "selection_rule": (f"per method, on seed {seeds[0]}: the smallest lr of the grid whose task "
                                   f"accuracy on the validation split reaches {args.task_target} (else the lr "
                                   f"of best validation accuracy, flagged); other seeds run at that lr"),
                "data": {"task_train": len(task_train), "task_val": len(task_val), "task_test": len(task_test),
                         "world_replay_facts": len(world), "world_copies": copies,
                         "world_share": len(world) * copies / len(train_records), "held_facts": len(held),
                         "known_before": len(known_ids), "base_task_val_acc": base_val,
                         "task_example": task_train[0]},
                "summary": summary, "runs": runs}

    def run(method: str, lr: float, seed: int) -> dict:
        for r in runs:
            if (r["method"], r["lr"], r["seed"]) == (method, lr, seed):
                return r
        model = load_model(bench.path, device=device)
        cfg = method_config(method, lr, seed, args)
        t = time.perf_counter()
        res = finetune(model, tok, train_records, cfg)
        wall = time.perf_counter() - t
        hits = prompt_response_hits(model, tok, held)
        adapter = cfg.adapter_config()
        routing = None
        if adapter is not None and adapter.router != "none":
            routing = _routing_by_type(model, tok, {"world": world, "task": task_train[:256], "held_world": held,
                                                    "task_test": task_test}, adapter.expert_group())
        r = {"method": method, "lr": lr, "seed": seed,
             "retention": sum(hits[i] for i in known_ids) / max(1, len(known_ids)),
             "task_val_acc": sum(prompt_response_hits(model, tok, task_val)) / len(task_val),
             "task_test_acc": sum(prompt_response_hits(model, tok, task_test)) / len(task_test),
             "replayed_fact_em": sum(prompt_response_hits(model, tok, world)) / len(world),
             "trainable_params": res.trainable_params, "train_seconds": round(wall, 2),
             "final_terms": res.history.final(), "routing_group_mass": routing}
        runs.append(r)
        _write(out, payload({}))
        print(f"{method:14s} lr={lr:.2e} seed={seed} retention={r['retention']:.3f} val={r['task_val_acc']:.3f} "
              f"test={r['task_test_acc']:.3f} {wall:.1f}s", flush=True)
        return r

    summary: dict[str, dict] = {}
    for method in methods:  # phase 1: the lr grid on the first seed
        centre = args.lr_full if method == "full" else args.lr_adapter
        seed0 = {centre * m: run(method, centre * m, seeds[0]) for m in grid}
        lr, reached = choose_dense_lr(seed0, args.task_target)
        summary[method] = {"chosen_lr": lr, "reached_target": reached,
                           "grid": {f"{k:.2e}": {"task_val_acc": v["task_val_acc"], "retention": v["retention"]}
                                    for k, v in seed0.items()}}
    for method in methods:  # phase 2: the other seeds at the chosen lr
        lr = summary[method]["chosen_lr"]
        rs = [run(method, lr, s) for s in seeds]
        stat = {}
        for key in ("retention", "task_val_acc", "task_test_acc", "replayed_fact_em"):
            vals = [r[key] for r in rs]
            stat[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
        if rs[0]["routing_group_mass"]:
            types = rs[0]["routing_group_mass"]
            stat["routing_group_mass_mean"] = {
                t: [statistics.fmean(r["routing_group_mass"][t][g] for r in rs) for g in range(len(types[t]))]
                for t in types}
        summary[method].update({"seeds": len(rs), "trainable_params": rs[0]["trainable_params"], **stat})
        print(f"chosen {method:14s} lr={lr:.2e} retention={stat['retention']['mean']:.3f} "
              f"[{stat['retention']['min']:.3f}, {stat['retention']['max']:.3f}] "
              f"task_test={stat['task_test_acc']['mean']:.3f}")
    _write(out, payload(summary))
    print(f"wrote {out} and {plot_dense(payload(summary), out.with_suffix('.png'))}")
    return 0


def plot_dense(payload: dict, path: Path) -> Path:
    """Left: world-knowledge retention against test task accuracy, every run (chosen lr filled).
    Right: router mass on the world group by data type, per LoRAMoE variant (mean over its runs at the
    chosen lr, or over all its runs while the summary is not written yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary = payload["runs"], payload.get("summary") or {}
    methods = [m for m in DENSE_METHODS if any(r["method"] == m for r in runs)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(methods):
        chosen = summary.get(m, {}).get("chosen_lr")
        rs = [r for r in runs if r["method"] == m]
        for r in rs:
            filled = chosen is not None and r["lr"] == chosen
            ax.scatter(r["task_test_acc"], r["retention"], color=f"C{i}", marker="o" if filled else "x",
                       label=m if r is rs[0] else None, alpha=0.9)
    ax.set_xlabel("task accuracy (test split)")
    ax.set_ylabel("world knowledge kept (held facts)")
    ax.set_title("dense model, FFN adapters (o = chosen lr, x = other lr)")
    ax.legend(fontsize=8)
    types = ["world", "task", "held_world", "task_test"]
    variants = [m for m in ("loramoe", "loramoe_nolbc") if m in methods]
    width = 0.8 / max(1, len(variants))
    for j, m in enumerate(variants):
        chosen = summary.get(m, {}).get("chosen_lr")
        rs = [r for r in runs if r["method"] == m and r["routing_group_mass"] and (chosen is None or r["lr"] == chosen)]
        if not rs:
            continue
        vals = [statistics.fmean(r["routing_group_mass"][t][0] for r in rs) for t in types]
        bx.bar([k + j * width for k in range(len(types))], vals, width, label=f"{m} ({len(rs)} runs)", color=f"C{j}")
    bx.axhline(0.5, color="grey", lw=0.8, ls="--")
    bx.set_xticks([k + width * (len(variants) - 1) / 2 for k in range(len(types))], types)
    bx.set_ylabel("router mass on the world group (experts 0-2)")
    bx.set_title("routing by data type")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
