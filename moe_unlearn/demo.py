"""The end-to-end demo: a model that knows fictitious facts forgets one domain of them, and the
methods are compared the only fair way, at matched forgetting.

    result = run_demo("demo-output")      # what `moe-unlearn demo` (and `make demo`) runs
    print(result.headline)

Steps (each a call into the library):
1. `load_or_build` the `natural` benchmark MoE (6 layers, 16 experts top-4 + a shared expert;
   its facts live in the MoE blocks: see `moe-unlearn locate`); the package ships its weights, so a
   fresh clone loads them instead of training;
2. `attribute_experts` on the forget data, with the retain data for the premise check: the
   SEUF target, its coverage of the forget tokens and its selectivity (forget / retain share);
3. a small frontier (`moe_unlearn.frontier`): NPO; `full`, `uoe` and the best MoE-aware
   variant of the full benchmark on this model (`cov+grip+null`: the experts covering 80% of the
   forget tokens, router and expert changes projected off the retain span); two learning rates
   each (chosen so that they bracket the forgetting level on `natural`: the headline interpolates between them), from the original weights every time;
   utility is measured on facts no unlearning run ever sees;
4. the headline: per method and variant, the best utility at matched forgetting (forget EM at
   most the guess level + 0.05), with the specialisation numbers; the frontier plot.

The full benchmark (4 methods, 3 variants, 5 learning rates, 3 seeds, 40 and 120 steps, on
`natural` and on the `localized` positive control) is `moe-unlearn frontier`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_unlearn.atomic import atomic_dir, check_out_dir, write_json, write_text
from moe_unlearn.errors import BadInputError
from moe_unlearn.frontier import FrontierConfig, interpolated, matched, results_path, run_frontier

REPORT_JSON, REPORT_MD = "demo_report.json", "demo_report.md"


@dataclass
class DemoConfig:
    """The demo's frontier: one seed, one step count, three learning rates per variant."""

    frontier: FrontierConfig = field(default_factory=lambda: FrontierConfig(
        model="natural", methods=("npo",), variants=("full", "uoe", "cov+grip+null"),
        lrs={"full": (1e-4, 3e-4), "uoe": (1e-2, 3e-2), "cov+grip+null": (3e-2, 1e-1)}, steps=(40,), seeds=(0,),
        probes=("replay",)))

    @classmethod
    def quick(cls) -> DemoConfig:
        """The CI configuration: the tiny test model, a few steps."""
        return cls(FrontierConfig(model="natural", methods=("ga", "npo"), variants=("full", "uoe", "cov+grip+null"),
                                  lrs={"full": (1e-3, 3e-3), "uoe": (1e-2, 3e-2), "cov+grip+null": (3e-2,)},
                                  steps=(6,), seeds=(0,), batch_size=8, quick=True, probes=("replay",)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DemoResult:
    headline: str
    out_dir: Path
    frontier: dict[str, Any]
    seconds: float


def _check_out_dir(out: Path) -> None:
    """The demo replaces its own previous output, never anything else."""
    check_out_dir(out)  # not a file, the current directory, unwritable or a full disk
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_JSON).exists())):
        raise BadInputError(f"{out} exists and is not an earlier demo output (no {REPORT_JSON}); "
                            "choose another --out or remove it")


def headline(data: dict[str, Any]) -> str:
    """The matched-forgetting table of a frontier result, plus the premise numbers, as plain text."""
    spec = data["specialisation"]
    level = data["guess_level"]
    lines = [f"bench model `{data['model']}`: SEUF target layer {spec['target'][0]} expert {spec['target'][1]} "
             f"covers {spec['coverage']:.2f} of the forget tokens, selectivity {spec['selectivity']} "
             f"-> UOE premise {'holds' if spec['premise_holds'] else 'does NOT hold'}",
             f"original: forget EM {data['original']['forget_em']:.3f}, utility EM "
             f"{data['original']['utility_em']:.3f}; guess level {level:.3f}", "",
             f"best utility EM at matched forgetting (forget EM <= {level + 0.05:.3f}):",
             f"{'method':8s} {'variant':10s} {'steps':>5s} {'lr':>7s} {'forget EM':>9s} {'utility EM':>10s} "
             f"{'neighbor EM':>11s} {'replay EM':>9s} {'utility @level':>14s} {'erased @level':>13s}"]
    interp, interp_erased = interpolated(data), interpolated(data, erased=True)

    def at_level(r: dict[str, Any]) -> str:
        return "never" if r.get("status") == "never reached" else (
            "-" if "utility_em" not in r else f"{r['utility_em']:.3f}" + ("*" if r["status"] == "always below" else ""))

    for (m, v, n), p in sorted(matched(data).items()):
        at, er = at_level(interp.get((m, v, n), {})), at_level(interp_erased.get((m, v, n), {}))
        if p is None:
            lines.append(f"{m:8s} {v:10s} {n:5d} {'-':>7s} {'(no lr of the grid forgets that much)':>52s} {at:>14s} "
                         f"{er:>13s}")
        else:
            replay = p.get("forget_em_replay")
            lines.append(f"{m:8s} {v:10s} {n:5d} {p['lr']:7.0e} {p['forget_em']:9.3f} {p['utility_em']:10.3f} "
                         f"{p['neighbor_em']:11.3f} {'-' if replay is None else format(replay, '.3f'):>9s} {at:>14s} "
                         f"{er:>13s}")
    lines.append("replay EM: forget EM with the original model's routing forced at every MoE layer; near the "
                 "original's = forgotten by the router, not erased")
    lines.append(f"utility @level: utility EM interpolated along the variant's frontier at forget EM = "
                 f"{level + 0.05:.3f} (the same level for every variant; * = every lr forgets more, nearest point; "
                 "never = no lr forgets that much); erased @level: the same, reading each run's forget level as "
                 "max(forget EM, replay EM), so forgetting that the original routing undoes does not count")
    return "\n".join(lines)


def run_demo(out_dir: str | os.PathLike = "demo-output", quick: bool = False, rebuild: bool = False, *,
             cache_dir: str | os.PathLike | None = None, config: DemoConfig | None = None,
             progress: bool = False, log: Callable[[str], None] = print) -> DemoResult:
    """Build or load the bench model, run the small frontier, write the report under `out_dir`
    (replacing an earlier demo output there, all at once at the end): demo_report.md/.json (the
    headline), frontier_<model>.json/.md/.png (every run, the summary and the plot)."""
    from moe_unlearn.bench_model import bench_config, load_or_build

    config = config or (DemoConfig.quick() if quick else DemoConfig())
    fc = config.frontier
    fc.validate()
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)
    t0 = time.perf_counter()
    log(f"[1/3] bench model `{fc.model}`: loading from the cache or training it (first time: a few minutes)")
    bench = load_or_build(bench_config(fc.model, quick=fc.quick), cache_root=cache_dir, rebuild=rebuild,
                          progress=progress)
    log(f"      {'trained' if bench.built else 'loaded'} {bench.path.name}: {bench.meta['num_parameters']:,} "
        f"parameters, knows {bench.meta['exact_match']['trained']:.1%} of its trained facts")
    n_runs = sum(len(fc.grid(v)) for v in fc.variants) * len(fc.methods) * len(fc.seeds)
    log(f"[2/3] frontier: {n_runs} runs ({', '.join(fc.methods)} x {', '.join(fc.variants)} x learning rates), "
        f"{max(fc.steps)} steps each, from the original weights every time")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, replace=True) as tmp:  # the whole report appears at once, or not at all
        res = run_frontier(fc, out_dir=tmp, cache_dir=cache_dir, progress=progress,
                           log=lambda s: log("      " + s))
        text = headline(res.data)
        seconds = round(time.perf_counter() - t0, 1)
        write_json(tmp / REPORT_JSON, {"headline": text, "config": config.to_dict(), "seconds": seconds,
                                       "frontier_file": results_path(".", fc.model, fc.quick).name,
                                       "matched": [{"method": m, "variant": v, "steps": n, **(p or {})}
                                                   for (m, v, n), p in sorted(matched(res.data).items())]})
        write_text(tmp / REPORT_MD, "# moe-unlearn demo\n\n```\n" + text + "\n```\n\n" + res.summary)
    log("[3/3] result")
    log("")
    log(text)
    log(f"\nreports in {out} ({seconds:.1f} s in all); the full benchmark: `moe-unlearn frontier`")
    return DemoResult(headline=text, out_dir=out, frontier=res.data, seconds=seconds)


__all__ = ["DemoConfig", "DemoResult", "headline", "run_demo"]
