"""Routing-frozen unlearning on a bench model: does keeping the routing fixed make MoE-aware
unlearning erase instead of re-route?

Variants (NPO, --steps steps, batch 16, max length 64, retain = retain_train facts):
- uoe: one attributed expert + its router, SEUF anchor (routing learned), lr 3e-2 (the probes' lr);
- cov_frozen: the experts that cover --coverage of the forget tokens, routers frozen (no anchor);
- cov_forced: the same, and the original top-K and gates forced at every MoE layer while training;
- full: every weight, routing learned;
- cov_frozen_sam: cov_frozen with sharpness-aware forgetting (sam_rho 0.01), for its relearning and its
  cost (seconds per step beside cov_frozen's);
- cov_frozen_undo: cov_frozen, then the trained experts noised (alpha 0.5) and the unlearned model
  distilled back into them for 40 steps (UNDO restricted to the trained experts).
Per run: forget EM, forget EM under the original routing (replay, original gates), the erased forget
level max(forget, replay), utility EM, the unlearning's wall time per step, and the calibrated relearning
attack (moe_unlearn.eval.relearn.calibrate_relearn: fine-tune every parameter on --relearn-fraction of the
forget facts at the highest lr of a grid under which the ORIGINAL model's held EM stays >= 0.9 x its EM
before the attack at every evaluated step): steps to half the original's held EM, area under the held-EM curve and the highest held
EM, beside the retrained reference's (the floor) and the original's.

Writes benchmarks/results/routing_frozen_<model>.json, rewritten after every run (resumable: runs
already there are skipped). Bench models come from the cache (built first if missing).

    OMP_NUM_THREADS=1 nice python benchmarks/bench_routing_frozen.py --seeds 0 1 --cache .cache/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "uoe": dict(scope="uoe", targets="seuf", routing="learned"),
    "cov_frozen": dict(scope="topm", targets="coverage", routing="frozen"),
    "cov_forced": dict(scope="topm", targets="coverage", routing="forced"),
    "full": dict(scope="full", targets=None, routing="learned"),
    "cov_frozen_sam": dict(scope="topm", targets="coverage", routing="frozen", sam_rho=0.01),
    "cov_frozen_undo": dict(scope="topm", targets="coverage", routing="frozen", distill_steps=40, distill_noise=0.5),
}
DEFAULT_LRS = {"uoe": [3e-2], "cov_frozen": [3e-2, 1e-2], "cov_forced": [3e-2, 1e-2], "full": [3e-4],
               "cov_frozen_sam": [3e-2], "cov_frozen_undo": [3e-2]}


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def evaluate_run(model, tok, facts, routing) -> dict:
    from moe_unlearn.bench_model import qa_records
    from moe_unlearn.eval import evaluate

    rep = evaluate(model, tok, forget=qa_records(facts.forget), original_routing={"forget": routing},
                   replay="original", extra_splits={"utility": qa_records(facts.utility)}, generate=False,
                   progress=False, batch_size=64)
    s = rep.splits
    f, r = s["forget"].exact_match, s["forget_replay"].exact_match
    return _round({"forget_em": f, "forget_em_replay": r, "forget_level": max(f, r),
                   "utility_em": s["utility"].exact_match, "forget_nll": s["forget"].nll,
                   "forget_nll_replay": s["forget_replay"].nll})


def relearn_summary(curve, level: float) -> dict:
    return {"curve": curve.to_dict(), "steps_to_half": curve.steps_to(level), "auc": curve.auc(),
            "max_em": curve.max_em()}


def step_times(model, snapshot, forget, retain, tok, cover, steps: int) -> dict:
    """Seconds per optimizer step of NPO on the coverage set, min over 3 alternating repeats (a shared machine's
    load only ever adds time), and each option's ratio to frozen routing without extras."""
    import torch

    from moe_unlearn.unlearning import unlearn

    options = {"learned": dict(routing="learned"), "frozen": dict(routing="frozen"),
               "forced": dict(routing="forced"), "frozen+sam": dict(routing="frozen", sam_rho=0.01)}
    best: dict[str, float] = {}
    for _ in range(3):
        for name, opt in options.items():
            res = unlearn(model, forget, retain, tokenizer=tok, method="npo", scope="topm", target=cover, steps=steps,
                          lr=1e-3, batch_size=16, max_length=64, progress=False, **opt)
            best[name] = min(best.get(name, float("inf")), res.history.wall_time / steps)
            with torch.no_grad():
                model.load_state_dict(snapshot)
    out = {"steps": steps, "repeats": 3, "seconds_per_step": {k: round(v, 4) for k, v in best.items()},
           "ratio_to_frozen": {k: round(v / best["frozen"], 3) for k, v in best.items()},
           "undo": "distillation steps cost one teacher and one student forward per batch (no reference pass); "
                   "its total is (unlearning steps + distill_steps) steps"}
    return out


def summarize(data: dict) -> dict:
    """Medians over seeds per (variant, lr)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in data["runs"]:
        groups.setdefault((r["variant"], r["lr"]), []).append(r)
    out = []
    for (v, lr), rs in sorted(groups.items()):
        row = {"variant": v, "lr": lr, "seeds": sorted(r["seed"] for r in rs)}
        for key in ("forget_em", "forget_em_replay", "forget_level", "utility_em", "seconds_per_step"):
            vals = [r[key] for r in rs]
            row[key] = round(statistics.median(vals), 4)
            row[key + "_range"] = [min(vals), max(vals)]
        for key in ("auc", "max_em"):
            row["relearn_" + key] = round(statistics.median(r["relearn"][key] for r in rs), 4)
        steps = [r["relearn"]["steps_to_half"] for r in rs]
        row["relearn_steps_to_half"] = steps  # per seed (None: not within the budget)
        out.append(row)
    return {"rows": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="natural")
    ap.add_argument("--cache", default=None, help="bench model cache root (default: the library's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--lrs", type=json.loads, default=None, help='JSON {variant: [lr, ...]} (default: the stated)')
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--coverage", type=float, default=0.8)
    ap.add_argument("--relearn-fraction", type=float, default=0.15)
    ap.add_argument("--relearn-steps", type=int, default=40)
    ap.add_argument("--relearn-every", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the retrained reference's curve for now (a later run without it fills it in)")
    ap.add_argument("--quick", action="store_true", help="the tiny test bench model (a smoke run)")
    ap.add_argument("--timing", type=int, default=0, metavar="STEPS",
                    help="only measure seconds per step (min over 3 alternating repeats of STEPS steps) of the coverage "
                         "set with learned / frozen / forced routing, SAM and UNDO's distillation, into 'step_time'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from moe_unlearn.atomic import write_json
    from moe_unlearn.attribution import attribute_experts, select_targets
    from moe_unlearn.bench_model import bench_config, load_or_build, qa_records, unlearning_records
    from moe_unlearn.eval import evaluate, record_routing
    from moe_unlearn.eval.relearn import RelearnConfig, calibrate_relearn, relearn_curve, split_indices
    from moe_unlearn.frontier import device_name
    from moe_unlearn.unlearning import unlearn

    lrs = {**DEFAULT_LRS, **(args.lrs or {})}
    path = Path(args.out) if args.out else RESULTS / f"routing_frozen_{args.model}{'_quick' if args.quick else ''}.json"
    data = json.loads(path.read_text()) if path.exists() else None
    bench = load_or_build(bench_config(args.model, quick=args.quick), cache_root=args.cache, progress=False)
    model, tok, facts = bench.model, bench.tokenizer, bench.facts
    forget, retain = unlearning_records(facts.forget), unlearning_records(facts.retain_train)
    routing = record_routing(model, tok, qa_records(facts.forget), batch_size=64)
    attr = attribute_experts(model, forget, tokenizer=tok, retain=retain, batch_size=64, progress=False)
    target, cover = attr.target(), select_targets(attr, coverage=args.coverage, warn=False)
    base = RelearnConfig(fraction=args.relearn_fraction, steps=args.relearn_steps, eval_every=args.relearn_every,
                         seed=0)
    tr_idx, held_idx = split_indices(len(facts.forget), base.fraction, base.seed)
    r_train = unlearning_records([facts.forget[i] for i in tr_idx])
    r_held = qa_records([facts.forget[i] for i in held_idx])
    if data is None:
        t = time.perf_counter()
        cal = calibrate_relearn(model, tok, r_train, r_held, base)
        ho = evaluate(model, tok, holdout=qa_records(facts.holdout), generate=False, progress=False, batch_size=64)
        level = round(0.5 * cal.original_curve.em[0], 4)
        data = {"model": args.model, "device": device_name(), "bench_model": bench.path.name,
                "guess_level": round(ho.splits["holdout"].exact_match, 4),
                "seuf_target": list(target), "coverage_targets": [list(c) for c in cover],
                "protocol": {"method": "npo", "steps": args.steps, "batch_size": 16, "max_length": 64,
                             "coverage": args.coverage, "variants": VARIANTS,
                             "forget_level": "max(forget EM, forget EM under the original routing)",
                             "relearn": "calibrated: every parameter fine-tuned on the relearn-train facts; lr = "
                                        "the highest of the grid keeping the original's held EM >= 0.9 x its EM "
                                        "before the attack at every evaluated step"},
                "original": evaluate_run(model, tok, facts, routing),
                "relearn": {"calibration": cal.to_dict(), "level": level, "n_train_facts": len(tr_idx),
                            "n_held_facts": len(held_idx), "original": relearn_summary(cal.original_curve, level),
                            "reference": None},
                "setup_seconds": round(time.perf_counter() - t, 1), "runs": []}
        write_json(path, data)
        print(f"calibrated relearn lr {cal.config.lr}; original {cal.original_curve.em}", flush=True)
    cal_cfg = RelearnConfig(**data["relearn"]["calibration"]["config"])
    level = data["relearn"]["level"]
    if data["relearn"]["reference"] is None and not args.no_reference:  # the floor: the retrained reference
        ref = load_or_build(bench_config(args.model, quick=args.quick, retrained=True), cache_root=args.cache,
                            progress=False)
        ref_curve = relearn_curve(ref.model, tok, r_train, r_held, cal_cfg)
        data["relearn"]["reference"] = relearn_summary(ref_curve, level)
        data["relearn"]["reference_eval"] = evaluate_run(ref.model, tok, facts, record_routing(
            ref.model, tok, qa_records(facts.forget), batch_size=64))
        del ref
        write_json(path, data)
        print(f"reference relearn {ref_curve.em}", flush=True)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.timing:
        data["step_time"] = step_times(model, snapshot, forget, retain, tok, cover, args.timing)
        write_json(path, data)
        print(data["step_time"], flush=True)
        return
    done = {(r["variant"], r["lr"], r["seed"]) for r in data["runs"]}
    for seed in args.seeds:
        for vname in args.variants:
            for lr in lrs[vname]:
                if (vname, lr, seed) in done:
                    continue
                v = VARIANTS[vname]
                t = time.perf_counter()
                res = unlearn(model, forget, retain, tokenizer=tok, method="npo", scope=v["scope"],
                              target={"seuf": [target], "coverage": cover}.get(v["targets"]),
                              routing=v["routing"], sam_rho=v.get("sam_rho", 0.0),
                              distill_steps=v.get("distill_steps", 0), distill_noise=v.get("distill_noise", 0.5),
                              steps=args.steps, lr=lr, batch_size=16, max_length=64,
                              seed=seed, progress=False)
                run = {"variant": vname, "lr": lr, "seed": seed, "targets": res.targets,
                       "trainable_params": res.trainable_params,
                       "seconds_per_step": round(res.wall_time / (args.steps + v.get("distill_steps", 0)), 4),
                       **evaluate_run(model, tok, facts, routing)}
                run["relearn"] = relearn_summary(relearn_curve(model, tok, r_train, r_held, cal_cfg), level)
                run["seconds"] = round(time.perf_counter() - t, 1)
                with torch.no_grad():
                    model.load_state_dict(snapshot)
                data["runs"].append(run)
                data["summary"] = summarize(data)
                write_json(path, data)
                print(f"{vname} lr {lr} seed {seed}: forget {run['forget_em']} replay {run['forget_em_replay']} "
                      f"utility {run['utility_em']} relearn {run['relearn']['curve']['em']} ({run['seconds']} s)",
                      flush=True)


if __name__ == "__main__":
    main()
