"""MUSE sustainability and scalability on the built-in bench model, with TOFU's forget quality and
model utility and MUSE's PrivLeak against the retrained reference model at every step.

    python benchmarks/eval_sequential_bench.py [--bench natural] [--requests 3] [--out benchmarks/results]

Sustainability: the forget domain's entities are split into --requests requests (by entity), applied
one after another as stacked patches. Scalability: the first n entities' facts, for growing n, each
unlearned from the original model. Every run: --method / --scope / --lr / --steps, nothing tuned.
Writes sequential_<bench>_cpu.json (both results, the settings, the device) into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import device_name  # noqa: E402

from moe_unlearn.atomic import write_text  # noqa: E402
from moe_unlearn.bench_model import bench_config, load_or_build, qa_records, unlearning_records  # noqa: E402
from moe_unlearn.bench_model.tofu_forms import tofu_records  # noqa: E402
from moe_unlearn.eval.sequential import UnlearnRequest, evaluate_scalability, evaluate_sequential  # noqa: E402
from moe_unlearn.eval.suite import reference_mia_aucs  # noqa: E402
from moe_unlearn.eval.tofu import tofu_evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="natural", choices=("natural", "localized"))
    ap.add_argument("--quick", action="store_true", help="the tiny test bench model (seconds)")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--method", default="npo")
    ap.add_argument("--scope", default="full")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    bench = load_or_build(bench_config(args.bench, quick=args.quick))
    ref = load_or_build(bench_config(args.bench, quick=args.quick, retrained=True))
    model, tok, facts = bench.model, bench.tokenizer, bench.facts
    world = facts.trained + facts.holdout
    forget_qa, holdout_qa = qa_records(facts.forget), qa_records(facts.holdout)
    eval_kwargs = dict(generate=False, convention="muse", batch_size=32,
                       reference_auc=reference_mia_aucs(ref.model, tok, forget_qa, holdout_qa, batch_size=32))
    tofu_forget = tofu_records(facts.forget, world)
    tofu_util = {"utility": tofu_records(facts.utility, world)}
    ref_tofu = tofu_evaluate(ref.model, tok, forget=tofu_forget, generate=False, batch_size=32)

    def tofu_numbers(m) -> dict[str, float]:
        r = tofu_evaluate(m, tok, forget=tofu_forget, utility=tofu_util, reference=ref_tofu, generate=False,
                          batch_size=32)
        return {"tofu.forget_quality": r.forget_quality, "tofu.model_utility_no_rouge": r.model_utility,
                "tofu.forget_truth_ratio": r.forget.truth_ratio}

    entities = sorted({f.entity for f in facts.forget})
    chunks = [entities[i::args.requests] for i in range(args.requests)]
    requests = []
    for i, chunk in enumerate(chunks):
        fs = [f for f in facts.forget if f.entity in set(chunk)]
        requests.append(UnlearnRequest(f"r{i + 1}", qa_records(fs), holdout=holdout_qa, train=unlearning_records(fs)))
    ukw = dict(method=args.method, scope=args.scope, lr=args.lr, steps=args.steps, seed=args.seed, progress=False)
    retain = unlearning_records(facts.retain_train)
    utility = {"utility": qa_records(facts.utility), "neighbor": qa_records(facts.neighbor)}
    with tempfile.TemporaryDirectory() as tmp:
        sust = evaluate_sequential(model, tok, requests, retain=retain, utility=utility, unlearn_kwargs=ukw,
                                   eval_kwargs=eval_kwargs, work_dir=Path(tmp) / "sust", extra_metrics=tofu_numbers)
        # scalability over whole entities: the forget facts ordered entity by entity
        ordered = [f for e in entities for f in facts.forget if f.entity == e]
        per = len(ordered) // len(entities)
        sizes = sorted({max(per, len(ordered) * k // 4 // per * per) for k in (1, 2, 4)})
        scal = evaluate_scalability(model, tok, qa_records(ordered), sizes, retain=retain, utility=utility,
                                    holdout=holdout_qa, unlearn_kwargs=ukw, eval_kwargs=eval_kwargs,
                                    work_dir=Path(tmp) / "scal", train=lambda n: unlearning_records(ordered[:n]),
                                    extra_metrics=tofu_numbers)
    out = {
        "benchmark": "eval_sequential_bench", "device": device_name(torch.device("cpu")), "platform": platform.platform(),
        "bench_model": bench.path.name, "reference_model": ref.path.name,
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "eval_convention": "muse",
                     "reference_auc": eval_kwargs["reference_auc"]},
        "reference_tofu_forget_truth_ratio": ref_tofu.forget.truth_ratio,
        "sustainability": sust.to_dict(), "scalability": scal.to_dict(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    path = Path(args.out) / f"sequential_{args.bench}{'_quick' if args.quick else ''}_cpu.json"
    write_text(path, json.dumps(out, indent=2) + "\n")
    print(sust.to_markdown())
    print(scal.to_markdown())
    print(f"wrote {path} in {out['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
