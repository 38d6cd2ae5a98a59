"""Fine-tune the demo MoE on a new task with LoRAMoE + the localized balancing constraint.

    .venv/bin/python examples/loramoe_finetune.py                # quick demo model, ~1 minute on a CPU
    .venv/bin/python examples/loramoe_finetune.py --bench default --steps 400

1. load (or build once, cached) the demo model that knows fictitious facts;
2. write a jsonl of the new task (facts about a new domain, ships with invented names, type
   "task"; `demo_task.new_domain_facts`) mixed with QA replay of some known facts (type "world");
3. run `moe-unlearn loramoe train` on it: 6 LoRA experts per attention projection in two
   groups (world, task), LBC weight 0.1 (the demo model's FFNs are fused routed experts, so
   the adapters go on q/k/v/o_proj);
4. load the saved adapter onto a stock copy of the model and compare task and fact exact match.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from moe_unlearn.bench_model import BenchModelConfig, load_or_build
from moe_unlearn.cli import main as cli
from moe_unlearn.loading import load_model
from moe_unlearn.loramoe import load_loramoe
from moe_unlearn.loramoe.demo_task import fact_records, new_domain_facts, prompt_response_exact_match


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", choices=("quick", "default"), default="quick")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="demo-output/loramoe")
    args = ap.parse_args(argv)

    bench = load_or_build(BenchModelConfig.quick() if args.bench == "quick" else BenchModelConfig())
    task = fact_records(new_domain_facts(bench.facts.trained + bench.facts.holdout, 24), type_label="task")
    world = fact_records(random.Random(0).sample(bench.facts.retain_train + bench.facts.utility,
                                             len(bench.facts.retain_train + bench.facts.utility) // 4))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "response", "type")}) + "\n"
                            for r in random.Random(1).sample(task + world, len(task + world))))

    run_dir = out / "run"
    rc = cli(["loramoe", "train", "--model", str(bench.path), "--data", str(data), "--out", str(run_dir),
              "--targets", "q_proj,k_proj,v_proj,o_proj", "--experts", "6", "--rank", "4",
              "--groups", "3,3", "--group-types", "world,task", "--lbc-weight", "0.1",
              "--steps", str(args.steps), "--lr", "5e-4", "--batch-size", "16", "--max-length", "64",
              "--checkpoint-every", "50", "--resume"])
    if rc:
        return rc

    stock = load_model(bench.path)  # local files only, eval mode
    facts = fact_records(bench.facts.trained)
    before = (prompt_response_exact_match(stock, bench.tokenizer, task),
              prompt_response_exact_match(stock, bench.tokenizer, facts))
    tuned = load_loramoe(stock, run_dir / "adapter")
    after = (prompt_response_exact_match(tuned, bench.tokenizer, task),
             prompt_response_exact_match(tuned, bench.tokenizer, facts))
    print(f"new task exact match  {before[0]:.3f} -> {after[0]:.3f}  (the new domain's questions)")
    print(f"fact exact match      {before[1]:.3f} -> {after[1]:.3f}  (all trained facts)")
    prompt = task[0]["prompt"]
    ids = bench.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    gen = tuned.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=bench.tokenizer.pad_token_id)
    print(repr(prompt), "->", repr(bench.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:],
                                                         skip_special_tokens=True)))
    print(f"routing stats and plots: {run_dir}/routing_mass.json, {run_dir}/routing_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(run())
