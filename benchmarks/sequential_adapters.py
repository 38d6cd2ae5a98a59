"""Sequential forget requests on the bench model: stacked full-slice patches vs stacked adapters vs
fused adapters (MUSE's sustainability, measured after every request).

    python benchmarks/sequential_adapters.py [--bench natural] [--requests 4] [--seeds 0,1,2]

The forget domain's entities are split into --requests requests (by entity, round robin). Modes:
  stacked-full     uoe on full expert slices, one patch per request on top of the previous ones;
  stacked-adapter  the same with a rank --rank adapter per request (stacked, each trained on the
                   model the earlier requests left);
  fused-adapter    each request's adapter trained from the base model, then all adapters so far
                   fused into one (fuse_patches), applied to the base model.
After each request: forget EM of every request (done and still to come), utility EM, neighbor
EM, retain EM. Each request is attributed on its own (its SEUF target).

Hyperparameters are not tuned on these splits: per variant, the learning rate is the smallest of
the frontier grid whose median forget EM on the whole forget domain reached the forgetting level
(guess level + 0.05) at --frontier-steps steps (where none did, the lr with the lowest median forget
EM) (read from the committed frontier results; forget
EM is the target, utility and neighbor EM are never read). One request is a quarter of the
domain, so --steps 40 per request is about the frontier's epochs at 120 steps.
Writes sequential_adapters_<bench>[_<method>][_steps<N>].json (resumable: one entry per mode and seed) and .png.
For the fused mode it also records each request's adapter applied alone (`adapters_alone`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import device_name  # noqa: E402

from moe_unlearn.atomic import write_text  # noqa: E402
from moe_unlearn.bench_model import bench_config, load_or_build, qa_records, unlearning_records  # noqa: E402
from moe_unlearn.eval.sequential import UnlearnRequest, evaluate_sequential  # noqa: E402
from moe_unlearn.frontier import MATCH_MARGIN, curves  # noqa: E402

MODES = {  # name: (sequential mode, frontier variant the lr comes from, adapter)
    "stacked-full": ("stacked", "uoe", False),
    "stacked-adapter": ("stacked", "uoe+lora{rank}", True),
    "fused-adapter": ("fused", "uoe+lora{rank}", True),
}


def choose_lr(frontier: dict, method: str, variant: str, steps: int) -> float:
    """The smallest grid lr whose median forget EM reached guess level + margin (forget EM only)."""
    points = curves(frontier).get((method, variant, steps))
    if not points:
        raise SystemExit(f"the frontier results hold no {method}/{variant} at {steps} steps; run the frontier first")
    level = frontier["guess_level"] + MATCH_MARGIN
    ok = sorted(p["lr"] for p in points if p["forget_em"] <= level + 1e-12)
    if not ok:  # none forgets that much: the lr that forgets most (still forget EM only)
        return min(points, key=lambda p: (p["forget_em"], p["lr"]))["lr"]
    return ok[0]


def summarize_run(result: dict, names: list[str]) -> list[dict]:
    """Per step: mean forget EM over the requests done so far and over those to come, utility / neighbor EM."""
    rows = []
    for s in result["steps"]:
        m, k = s["metrics"], s["step"]
        em = {n: m[f"forget_{n}.exact_match"] for n in names}
        rows.append({"step": k, "forget_done": statistics.mean(em[n] for n in names[:k]) if k else None,
                     "forget_todo": statistics.mean(em[n] for n in names[k:]) if k < len(names) else None,
                     "forget_first": em[names[0]], "utility": m["utility.exact_match"],
                     "neighbor": m["neighbor.exact_match"], "retain": m["retain.exact_match"], "per_request": em})
    return rows


def adapters_alone(model, tok, work: Path, requests: list, utility: dict) -> list[dict]:
    """Fused mode's diagnosis: each request's adapter applied alone to the base model (what fusion
    starts from): forget EM of every request, utility and neighbor EM."""
    from moe_unlearn.eval import evaluate
    from moe_unlearn.unlearning import apply_patch, revert_patch

    out = []
    for k, req in enumerate(requests, start=1):
        patch = work / f"step{k}_{req.name}" / "adapter"
        apply_patch(model, patch)
        try:
            rep = evaluate(model, tok, extra_splits={**{f"forget_{r.name}": r.forget for r in requests}, **utility},
                           generate=False, progress=False, batch_size=64)
        finally:
            revert_patch(model, patch)
        out.append({"request": req.name, **{name: rep.splits[name].exact_match for name in rep.splits
                                              if name.startswith("forget_") or name in utility}})
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("forget_done", "forget EM, requests so far"), ("forget_first", "forget EM, request 1"),
            ("utility", "utility EM"), ("neighbor", "neighbor EM")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for mode, color in zip(MODES, ("tab:red", "tab:blue", "tab:green"), strict=True):
            runs = [r for r in data["runs"] if r["mode"] == mode]
            if not runs:
                continue
            steps = [row["step"] for row in runs[0]["summary"] if row[key] is not None]
            med = [statistics.median(r["summary"][s][key] for r in runs) for s in steps]
            lo = [min(r["summary"][s][key] for r in runs) for s in steps]
            hi = [max(r["summary"][s][key] for r in runs) for s in steps]
            ax.plot(steps, med, marker="o", color=color, label=mode)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
        ax.axhline(data["guess_level"], color="gray", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("requests applied")
        ax.set_xticks(range(len(data["requests"]) + 1))
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sequential requests, bench `{data['bench']}` ({data['method']}, median and range over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="natural", choices=("natural", "localized"))
    ap.add_argument("--quick", action="store_true", help="the tiny test bench model (seconds)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--method", default="npo")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per request")
    ap.add_argument("--frontier-steps", type=int, default=120)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--frontier", default=None, help="frontier results to read the lrs from "
                    "(default: benchmarks/results/frontier_<bench>.json)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    frontier_path = Path(args.frontier or Path(__file__).resolve().parent / "results" / f"frontier_{args.bench}.json")
    frontier = json.loads(frontier_path.read_text())
    lrs = {m: choose_lr(frontier, args.method, MODES[m][1].format(rank=args.rank), args.frontier_steps) for m in modes}

    bench = load_or_build(bench_config(args.bench, quick=args.quick), cache_root=args.cache_dir)
    model, tok, facts = bench.model, bench.tokenizer, bench.facts
    entities = sorted({f.entity for f in facts.forget})
    chunks = [set(entities[i::args.requests]) for i in range(args.requests)]
    requests = []
    for i, chunk in enumerate(chunks):
        fs = [f for f in facts.forget if f.entity in chunk]
        requests.append(UnlearnRequest(f"r{i + 1}", qa_records(fs), train=unlearning_records(fs)))
    names = [r.name for r in requests]
    retain = unlearning_records(facts.retain_train)
    utility = {"utility": qa_records(facts.utility), "neighbor": qa_records(facts.neighbor)}
    tag = ("" if args.method == "npo" else f"_{args.method}") + ("" if args.steps == 40 else f"_steps{args.steps}")
    path = Path(args.out) / f"sequential_adapters_{args.bench}{tag}{'_quick' if args.quick else ''}.json"
    data = json.loads(path.read_text()) if path.exists() else {
        "benchmark": "sequential_adapters", "bench": args.bench, "device": device_name(torch.device("cpu")),
        "bench_model": bench.path.name, "method": args.method, "rank": args.rank, "steps_per_request": args.steps,
        "requests": {r.name: len(r.forget) for r in requests}, "guess_level": frontier["guess_level"],
        "lr_rule": f"smallest frontier lr with median forget EM <= guess level + {MATCH_MARGIN} at "
                   f"{args.frontier_steps} steps, else the lr of lowest median forget EM ({frontier_path.name})", "lrs": lrs, "runs": []}
    done = {(r["mode"], r["seed"]) for r in data["runs"]}
    for seed in seeds:
        for mode in modes:
            if (mode, seed) in done:
                continue
            seq_mode, _, adapter = MODES[mode]
            ukw = dict(method=args.method, scope="uoe", lr=lrs[mode], steps=args.steps, seed=seed, batch_size=16,
                       max_length=64, progress=False)
            if adapter:
                ukw.update(adapter="lora", adapter_rank=args.rank)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                res = evaluate_sequential(model, tok, requests, retain=retain, utility=utility, mode=seq_mode,
                                          unlearn_kwargs=ukw, eval_kwargs=dict(generate=False, batch_size=64),
                                          work_dir=Path(tmp))
                sizes = {str(p.parent.relative_to(tmp)): p.stat().st_size for p in Path(tmp).rglob("patch.safetensors")}
                alone = adapters_alone(model, tok, Path(tmp), requests, utility) if seq_mode == "fused" else None
            d = res.to_dict()
            data["runs"].append({"mode": mode, "seed": seed, "lr": lrs[mode], "summary": summarize_run(d, names),
                                 "patch_bytes": sizes, "seconds": round(time.perf_counter() - t0, 1), "result": d,
                                 **({"adapters_alone": alone} if alone is not None else {})})
            write_text(path, json.dumps(data, indent=1) + "\n")
            last = data["runs"][-1]["summary"][-1]
            print(f"{mode} seed {seed} lr {lrs[mode]:g}: after {len(names)} requests forget EM {last['forget_done']:.3f} "
                  f"(request 1 {last['forget_first']:.3f}), utility {last['utility']:.3f}, neighbor "
                  f"{last['neighbor']:.3f} ({data['runs'][-1]['seconds']} s)", flush=True)
    plot(data, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
