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
from moe_unlearn.loading import load_model
from moe_unlearn.loramoe.config import LoRAMoEConfig
from moe_unlearn.loramoe.demo_task import fact_records, new_domain_facts, prompt_response_hits
from moe_unlearn.loramoe.finetune import FinetuneConfig, finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("loramoe", "lora", "full", "loramoe_nolbc", "lora_wide")


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
    ap.add_argument("--bench", choices=("quick", "small", "default"), default="small")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-entities", type=int, default=24, help="ships of the new domain (4 facts each)")
    ap.add_argument("--replay", type=float, default=0.25, help="fraction of retain facts replayed as 'world' data")
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lbc-weight", type=float, default=0.1)
    ap.add_argument("--convention", choices=("divide", "official"), default="divide")
    ap.add_argument("--lr-adapter", type=float, default=5e-4, help="grid centre of the adapter methods")
    ap.add_argument("--lr-full", type=float, default=5e-5, help="grid centre of full fine-tuning")
    ap.add_argument("--lr-grid", default="0.5,1,2", help="multipliers of the centre; the same for every method")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--retention-floor", type=float, default=0.5)
    ap.add_argument("--tie", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/loramoe_retention_<dev>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {','.join(METHODS)}")
    grid = [float(m) for m in args.lr_grid.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

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
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "loramoe_retention", "device": device_name(device), "device_type": device.type,
               "torch_threads": torch.get_num_threads(),
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "moe_unlearn": moe_unlearn.__version__},
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "bench_model": args.bench,
               "bench_model_meta": {k: bench.meta.get(k) for k in ("digest", "exact_match", "steps")},
               "bench_build_seconds": round(build_s, 1), "args": vars(args),
               "selection_rule": (f"per method, on seed means per lr: among lrs with retention >= "
                                  f"{args.retention_floor} (all if none), those with task_em within {args.tie} "
                                  f"of the best; of those the highest retention"),
               "data": {"task_facts": len(task), "world_replay": len(world), "held_facts": len(held),
                        "known_before": len(known_ids), "base_task_em": sum(base_task) / len(task),
                        "task_example": task[0]},
               "summary": summary, "runs": runs}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
