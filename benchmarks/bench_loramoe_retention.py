"""Does world knowledge survive fine-tuning? LoRAMoE+LBC vs plain LoRA vs full fine-tuning.

On the demo model (moe_unlearn.bench_model), each method fine-tunes a fresh copy for the
same number of steps on the same data: a new task (word-order reversal, type "task") mixed
with QA replay of a fraction of the retain facts (type "world", the LBC's second type).
Reported per method:
- retention: of the trained facts the model answered exactly before (replayed facts excluded),
  the fraction it still answers exactly after;
- task_em: exact match on held-out reversal prompts (word triples never trained);
- wall time and trainable parameters.
The demo model's FFNs are all routed experts (fused 3-D parameters), so the adapters wrap the
attention projections q/k/v/o_proj. Results go to benchmarks/results/loramoe_retention_<device>.json.

    .venv/bin/python benchmarks/bench_loramoe_retention.py --bench quick --steps 150
    .venv/bin/python benchmarks/bench_loramoe_retention.py --bench default --steps 400 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moe_unlearn.bench_model import BenchModelConfig, FactsConfig, load_or_build
from moe_unlearn.bench_model.facts import POOLS
from moe_unlearn.loramoe.demo_task import (
    fact_records,
    prompt_response_exact_match,
    prompt_response_hits,
    word_reversal_records,
)
from moe_unlearn.loramoe.finetune import FinetuneConfig, finetune

RESULTS = Path(__file__).resolve().parent / "results"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def bench_config(name: str) -> BenchModelConfig:
    if name == "quick":
        return BenchModelConfig.quick()
    if name == "small":  # between quick and default: knows most of its facts, builds in minutes on a CPU
        return BenchModelConfig(name="facts-moe-small",
                                facts=FactsConfig(entities_per_domain=12, neighbor_entities=4, holdout_entities=6),
                                vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                num_experts=4, moe_intermediate_size=64, steps=500, batch_size=32, lr=3e-3,
                                warmup_steps=20, extra_steps=200, extra_rounds=2)
    return BenchModelConfig()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def method_config(method: str, args: argparse.Namespace) -> FinetuneConfig:
    common = dict(method=method, steps=args.steps, batch_size=args.batch_size, max_length=64, seed=args.seed,
                  target_modules=ATTENTION, rank=args.rank, alpha=args.alpha, dropout=0.05, progress=False,
                  lr=args.lr_full if method == "full" else args.lr_adapter)
    if method == "loramoe":
        return FinetuneConfig(**common, num_experts=args.experts, groups=[args.experts // 2, args.experts
                                                                          - args.experts // 2],
                              group_types=["world", "task"], lbc_weight=args.lbc_weight, lbc_delta=0.1,
                              lbc_convention=args.convention)
    return FinetuneConfig(**common)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", choices=("quick", "small", "default"), default="small")
    ap.add_argument("--methods", default="loramoe,lora,full")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--task-train", type=int, default=2000, help="reversal training prompts")
    ap.add_argument("--task-eval", type=int, default=200, help="held-out reversal prompts")
    ap.add_argument("--replay", type=float, default=0.25, help="fraction of retain facts replayed as 'world' data")
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lbc-weight", type=float, default=0.1)
    ap.add_argument("--convention", choices=("divide", "official"), default="divide")
    ap.add_argument("--lr-adapter", type=float, default=2e-3)
    ap.add_argument("--lr-full", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/loramoe_retention_<dev>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    bench = load_or_build(bench_config(args.bench), progress=True)
    build_s = time.perf_counter() - t0
    tok = bench.tokenizer
    words = sorted({w for pool in POOLS.values() for w in pool})
    task_train = word_reversal_records(words, args.task_train, seed=args.seed)
    task_eval = word_reversal_records(words, args.task_eval, seed=args.seed + 1,
                                      exclude={tuple(r["words"]) for r in task_train})
    rng = random.Random(args.seed)
    retain = list(bench.facts.retain)
    replayed = set(rng.sample(range(len(retain)), int(args.replay * len(retain))))
    world_train = fact_records([retain[i] for i in sorted(replayed)])
    kept_facts = fact_records([f for i, f in enumerate(retain) if i not in replayed]
                              + list(bench.facts.forget) + list(bench.facts.neighbor))
    train_records = task_train + world_train
    random.Random(args.seed + 2).shuffle(train_records)

    base = bench.model.to(device)
    known_before = prompt_response_hits(base, tok, kept_facts)
    known_ids = [i for i, k in enumerate(known_before) if k]
    results = {"base": {"fact_em": sum(known_before) / len(known_before),
                        "task_em": prompt_response_exact_match(base, tok, task_eval)}}
    print(f"base: knows {len(known_ids)}/{len(kept_facts)} held facts, task EM {results['base']['task_em']:.3f}")
    for method in args.methods.split(","):
        model = AutoModelForCausalLM.from_pretrained(bench.path).to(device)
        cfg = method_config(method, args)
        t = time.perf_counter()
        res = finetune(model, tok, train_records, cfg)
        wall = time.perf_counter() - t
        hits = prompt_response_hits(model, tok, kept_facts)
        results[method] = {
            "retention": sum(hits[i] for i in known_ids) / max(1, len(known_ids)),
            "fact_em": sum(hits) / len(hits),
            "task_em": prompt_response_exact_match(model, tok, task_eval),
            "replayed_fact_em": prompt_response_exact_match(model, tok, world_train),
            "final_nll": res.history.final().get("nll"),
            "trainable_params": res.trainable_params, "train_seconds": round(wall, 1), "lr": cfg.lr,
            "routing_group_mass": res.routing,
        }
        print(method, json.dumps({k: v for k, v in results[method].items() if k != "routing_group_mass"}))
        sys.stdout.flush()

    out = Path(args.out) if args.out else RESULTS / f"loramoe_retention_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "loramoe_retention", "device": device_name(device), "torch": torch.__version__,
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "bench_model": args.bench,
               "bench_model_meta": {k: bench.meta.get(k) for k in ("digest", "exact_match", "steps")},
               "bench_build_seconds": round(build_s, 1), "args": vars(args),
               "data": {"task_train": len(task_train), "task_eval": len(task_eval), "world_replay": len(world_train),
                        "held_facts": len(kept_facts), "known_before": len(known_ids)},
               "results": results}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
