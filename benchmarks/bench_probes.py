"""Is it erased or hidden? Routing replay, paraphrase / completion probes and relearning curves
for a few unlearning runs on the bench models.

Per bench model (`natural`, `localized`; cached models reused from --cache):
- runs: npo with variants full, uoe, uoe+grip+null, cov+grip+null at one learning rate each
  (the matched-forgetting lr of benchmarks/results/frontier_<model>.json at --steps when the
  frontier has it, else the stated fallback: the uoe lr), plus `ablate` of the SEUF target;
- per run: forget EM / NLL, forget EM / NLL under routing replay (original and current gates),
  question-paraphrase EM, completion EM (second statement cut before the answer), utility EM;
- relearning: a copy fine-tuned on --relearn-fraction of the forget facts, EM on the other forget
  facts over steps, for each run, the retrained reference and the original.
Writes benchmarks/results/probes_<model>.json (resumable: runs already there are skipped, the
file is rewritten after every run) and probes_<model>.png (relearning curves).

    nice -n 10 .venv/bin/python benchmarks/bench_probes.py --models natural localized --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moe_unlearn.atomic import write_json
from moe_unlearn.frontier import VARIANTS, device_name, matched

RESULTS = Path(__file__).parent / "results"
RUN_VARIANTS = ("uoe+grip+null", "full", "uoe", "cov+grip+null")  # in the order they run
FALLBACK_LR = {"full": 3e-4, "uoe": 3e-2}  # used only when the frontier file has no matched lr


def pick_lr(frontier: dict | None, method: str, variant: str, steps: int) -> tuple[float, str]:
    """(lr, where it came from): the frontier's matched-forgetting lr, else the uoe one, else the fallback."""
    best = matched(frontier) if frontier else {}
    for v in (variant, "uoe" if VARIANTS[variant].scope != "full" else "full"):
        p = best.get((method, v, steps))
        if p is not None:
            return float(p["lr"]), f"frontier matched lr of {method}/{v} at {steps} steps"
    fb = FALLBACK_LR["full" if VARIANTS[variant].scope == "full" else "uoe"]
    return fb, "stated fallback (no matched lr in the frontier file)"


def evaluate_run(model, tok, facts, routing) -> dict:
    from moe_unlearn.bench_model import completion_records, paraphrase_records, qa_records
    from moe_unlearn.eval import evaluate

    out = {}
    for gates in ("original", "current"):
        rep = evaluate(model, tok, forget=qa_records(facts.forget), original_routing={"forget": routing},
                       replay=gates, generate=False, progress=False, batch_size=64,
                       **({"extra_splits": {"paraphrase": paraphrase_records(facts.forget),
                                            "utility": qa_records(facts.utility)},
                           "completion": completion_records(facts.forget)} if gates == "original" else {}))
        s = rep.splits
        if gates == "original":
            out.update(forget_em=s["forget"].exact_match, forget_nll=s["forget"].nll,
                       forget_em_replay=s["forget_replay"].exact_match, forget_nll_replay=s["forget_replay"].nll,
                       paraphrase_em=s["paraphrase"].exact_match, completion_em=s["completion"].exact_match,
                       utility_em=s["utility"].exact_match, overlap_forget=rep.routing["forget"].overlap_mean)
        else:
            out.update(forget_em_replay_current=s["forget_replay"].exact_match,
                       forget_nll_replay_current=s["forget_replay"].nll)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def run_model(name: str, args) -> Path:
    from moe_unlearn.attribution import attribute_experts, select_targets
    from moe_unlearn.bench_model import bench_config, load_or_build, qa_records, unlearning_records
    from moe_unlearn.eval import record_routing
    from moe_unlearn.eval.relearn import RelearnConfig, plot_relearn, relearn_curve, split_indices
    from moe_unlearn.frontier import COVERAGE
    from moe_unlearn.unlearning import unlearn

    path = RESULTS / f"probes_{name}{'_quick' if args.quick else ''}.json"
    data = json.loads(path.read_text()) if path.exists() else None
    bench = load_or_build(bench_config(name, quick=args.quick), cache_root=args.cache, progress=False)
    model, tok, facts = bench.model, bench.tokenizer, bench.facts
    forget, retain = unlearning_records(facts.forget), unlearning_records(facts.retain_train)
    routing = record_routing(model, tok, qa_records(facts.forget), batch_size=64)
    rcfg = RelearnConfig(fraction=args.relearn_fraction, steps=args.relearn_steps, eval_every=args.relearn_every,
                         lr=args.relearn_lr, seed=0)
    tr_idx, held_idx = split_indices(len(facts.forget), rcfg.fraction, rcfg.seed)
    relearn_train = unlearning_records([facts.forget[i] for i in tr_idx])
    relearn_held = qa_records([facts.forget[i] for i in held_idx])
    attr = attribute_experts(model, forget, tokenizer=tok, retain=retain, batch_size=64, progress=False)
    target, cover = attr.target(), select_targets(attr, coverage=COVERAGE, warn=False)
    fpath = Path(args.frontier_dir) / f"frontier_{name}.json"
    frontier = json.loads(fpath.read_text()) if fpath.exists() else None
    if data is None:
        from moe_unlearn.eval import evaluate

        ho = evaluate(model, tok, holdout=qa_records(facts.holdout), generate=False, progress=False, batch_size=64)
        data = {"model": name, "device": device_name(), "bench_model": bench.path.name,
                "target": list(target), "coverage_targets": [list(c) for c in cover],
                "guess_level": round(ho.splits["holdout"].exact_match, 4),
                "original": evaluate_run(model, tok, facts, routing),
                "protocol": {"method": args.method, "steps": args.steps, "batch_size": 16, "max_length": 64,
                             "replay": "original model's top-K indices forced at every MoE layer on the forget QA "
                                       "items, with its gate values (forget_em_replay) or the current router's "
                                       "renormalised scores at those experts (forget_em_replay_current)",
                             "paraphrase": "second question per forget fact (never trained, never in unlearning)",
                             "completion": "second statement per forget fact cut before the answer, no template "
                                           "(trained, never in unlearning)"},
                "runs": []}
        write_json(path, data)
        print(f"{name}: original {data['original']}", flush=True)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    todo = [(args.method, v, s) for s in args.seeds for v in args.variants]
    todo.insert(0, ("ablate", "uoe", 0))

    def unlearned(method: str, vname: str, seed: int):
        """Run the unlearning in place (deterministic for the seed); returns (result, lr, lr source)."""
        if method == "ablate":
            return unlearn(model, forget, tokenizer=tok, method="ablate", scope="uoe", target=[target],
                           progress=False), None, "no training"
        variant = VARIANTS[vname]
        lr, src = pick_lr(frontier, method, vname, args.steps)
        res = unlearn(model, forget, retain, tokenizer=tok, method=method, scope=variant.scope,
                      target={"seuf": [target], "coverage": cover}.get(variant.targets), steps=args.steps,
                      lr=lr, batch_size=16, max_length=64, seed=seed, progress=False, **variant.options)
        return res, lr, src

    # phase 1: replay / paraphrase / completion for every run (cheap)
    done = {(r["method"], r["variant"], r["seed"]) for r in data["runs"]}
    for method, vname, seed in todo:
        if (method, vname, seed) in done:
            continue
        t = time.perf_counter()
        res, lr, src = unlearned(method, vname, seed)
        metrics = evaluate_run(model, tok, facts, routing)
        model.load_state_dict(snapshot)
        run = {"method": method, "variant": vname, "seed": seed, "lr": lr, "lr_source": src, "targets": res.targets,
               **metrics, "seconds": round(time.perf_counter() - t, 1)}
        data["runs"].append(run)
        write_json(path, data)
        print(f"{name} {method}/{vname} seed {seed} lr {lr}: " + json.dumps(run), flush=True)
    if args.no_relearn:
        return path
    # phase 2: relearning curves (costly): the original's and the retrained reference's once, then per run
    if "relearn" not in data:
        ref = load_or_build(bench_config(name, quick=args.quick, retrained=True), cache_root=args.cache,
                            progress=False)
        orig_c = relearn_curve(model, tok, relearn_train, relearn_held, rcfg).to_dict()
        ref_c = relearn_curve(ref.model, tok, relearn_train, relearn_held, rcfg).to_dict()
        lvl = 0.5 * orig_c["em"][0]
        data["relearn"] = {"config": vars(rcfg), "n_train_facts": len(tr_idx), "n_held_facts": len(held_idx),
                           "reference_model": ref.path.name,
                           "train_forms": "QA (answer-only loss) + first statement per fine-tuned fact",
                           "original": orig_c, "reference": ref_c, "level": lvl,
                           "reference_steps_to_half": _steps_to(ref_c, lvl)}
        del ref
        write_json(path, data)
        print(f"{name}: relearn original {orig_c['em']}, reference {ref_c['em']}", flush=True)
    lvl, ref_steps = data["relearn"]["level"], data["relearn"]["reference_steps_to_half"]
    for run in data["runs"]:
        if "relearn" in run:
            continue
        t = time.perf_counter()
        unlearned(run["method"], run["variant"], run["seed"])
        curve = relearn_curve(model, tok, relearn_train, relearn_held, rcfg).to_dict()
        model.load_state_dict(snapshot)
        steps = _steps_to(curve, lvl)
        run.update({"relearn": curve, "relearn_steps_to_half": steps,
                    "relearn_relative_to_reference": (None if steps is None else
                                                      round(steps / (ref_steps if ref_steps is not None
                                                                     else rcfg.steps + 1), 4)),
                    "relearn_seconds": round(time.perf_counter() - t, 1)})
        write_json(path, data)
        print(f"{name} {run['method']}/{run['variant']} relearn {curve['em']}", flush=True)
        plot(data, path.with_suffix(".png"), plot_relearn)
    return path


def _steps_to(curve: dict, level: float) -> int | None:
    return next((s for s, e in zip(curve["steps"], curve["em"], strict=True) if e >= level - 1e-12), None)


def plot(data: dict, path: Path, plot_relearn) -> None:
    panels = {}
    for r in (r for r in data["runs"] if "relearn" in r):
        key = f"{r['method']}/{r['variant']} (seed {r['seed']})"
        panels[key] = {"unlearned": r["relearn"], "retrained ref": data["relearn"]["reference"],
                       "original": data["relearn"]["original"]}
    if panels:
        plot_relearn(panels, path, level=data["relearn"]["level"],
                     title=f"{data['model']}: held forget EM while fine-tuning on "
                           f"{data['relearn']['n_train_facts']} forget facts (dashed: half the original)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["natural", "localized"])
    ap.add_argument("--method", default="npo")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--variants", nargs="+", default=list(RUN_VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--relearn-fraction", type=float, default=0.15)
    ap.add_argument("--relearn-steps", type=int, default=30)
    ap.add_argument("--relearn-every", type=int, default=5)
    ap.add_argument("--relearn-lr", type=float, default=1e-3)
    ap.add_argument("--cache", default="/work/cache")
    ap.add_argument("--frontier-dir", default=str(RESULTS))
    ap.add_argument("--no-relearn", action="store_true", help="phase 1 only (replay, paraphrase, completion)")
    ap.add_argument("--quick", action="store_true", help="the tiny test bench model (a smoke run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    for phase_relearn in ((False,) if args.no_relearn else (False, True)):  # every model's cheap probes first
        for name in args.models:
            args.no_relearn = not phase_relearn
            print(run_model(name, args), flush=True)


if __name__ == "__main__":
    sys.exit(main())
