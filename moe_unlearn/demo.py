"""The end-to-end demo: a model that knows fictitious facts, then forgets one domain of them.

    result = run_demo("demo-output")      # what `moe-unlearn demo` (and `make demo`) runs
    print(result.table)

Steps (each a call into the library):
1. `load_or_build` the benchmark MoE (trained once, cached);
2. `attribute_experts` on the forget split: the SEUF target (layer, expert);
3. for every method x scope: `unlearn` from the original weights, `evaluate` against the
   original routing, `revert_patch` (checked bit-exact against a copy of the weights); plus, per
   method, `uoe+kpb`: uoe with knowledge-preserving expert balancing (`retain_routing_weight`);
4. one side-by-side table, printed and written with the per-run reports under `out_dir`.

Full, uoe and uoe+kpb runs of one method share every hyperparameter (steps, batch, learning
rate); nothing is tuned per scope.

Retain data in training: every run gets the retain split's training texts (shuffled once with
the seed, see `_retain_train_texts`). GA ignores them unless the kpb term is on; NPO's default
objective adds alpha * NLL(retain) (alpha = 1) in every NPO run; the `+kpb` rows add
retain_routing_weight * KL(original || current routing) on retain tokens at the trained router
(uoe: the target layer only). So `npo/uoe` vs `npo/uoe+kpb` differ in exactly the routing term.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_unlearn.atomic import atomic_dir, write_json, write_text
from moe_unlearn.bench_model import BenchModelConfig, Fact, load_or_build
from moe_unlearn.errors import BadInputError

REPORT_JSON, REPORT_MD = "demo_report.json", "demo_report.md"
SWEEP_LRS = (3e-4, 1e-3, 1e-2)  # `--sweep`: extra learning rates, the same for every method and scope


@dataclass
class DemoConfig:
    """What the demo runs. lr maps each method to the learning rate used for all its scopes."""

    bench: BenchModelConfig = field(default_factory=BenchModelConfig)
    methods: tuple[str, ...] = ("ga", "npo")
    scopes: tuple[str, ...] = ("full", "uoe")
    steps: int = 40
    batch_size: int = 16
    lr: dict[str, float] = field(default_factory=lambda: {"ga": 3e-3, "npo": 3e-3})
    sweep_lrs: tuple[float, ...] = ()  # extra runs of every method x scope at these learning rates
    # knowledge-preserving expert balancing: extra "<method>/<scope>+kpb" rows for these scopes with
    # unlearn(retain_routing_weight=kpb_weight). 1.0 = the same weight as the SEUF router anchor
    # (anchor_weight, alpha = 1 in the paper), so the router's forget-side pull (anchor) and its
    # retain-side hold (KL) count equally; not tuned. 0 (or no scopes) = no kpb rows.
    kpb_weight: float = 1.0
    kpb_scopes: tuple[str, ...] = ("uoe",)
    eval_retain: int | None = None  # retain facts evaluated: None = all, n = a seeded sample of n
    eval_batch_size: int = 64
    generate: bool = True  # QA ROUGE-L and VerbMem by greedy decoding (exact match needs none)
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """The CI configuration: tiny world, tiny model, a few steps, no generation."""
        return cls(bench=BenchModelConfig.quick(), steps=6, batch_size=8, lr={"ga": 5e-4, "npo": 5e-4},
                   eval_retain=32, eval_batch_size=32, generate=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bench"] = self.bench.to_dict()
        return d


@dataclass
class DemoRow:
    """One line of the table: the original model or one unlearning run (method/scope)."""

    name: str
    method: str | None
    scope: str | None
    lr: float | None
    steps: int
    forget_em: float
    retain_em: float
    neighbor_em: float
    holdout_em: float
    forget_nll: float
    retain_nll: float
    mia_auc: float  # LOSS attack, forget (members) vs holdout; 0.5 = indistinguishable
    overlap_forget: float
    overlap_retain: float
    trainable_params: int
    unlearn_seconds: float
    eval_seconds: float
    targets: list[str] = field(default_factory=list)
    retain_routing_weight: float = 0.0  # > 0: a "+kpb" run (knowledge-preserving expert balancing)
    overlap_retain_target_layer: float | None = None  # retain overlap at the SEUF target layer only
    final_terms: dict[str, float] = field(default_factory=dict)  # loss terms of the last training step


@dataclass
class DemoResult:
    rows: list[DemoRow]
    table: str
    out_dir: Path
    model_path: Path
    model_built: bool
    target: tuple[int, int]
    target_near_tie: bool
    model_exact_match: float
    seconds: dict[str, float]

    def row(self, name: str) -> DemoRow:
        return next(r for r in self.rows if r.name == name)


# -- data --------------------------------------------------------------------------------------

def _records(facts: Sequence[Fact]) -> list[dict[str, str]]:
    return [{"question": f.question, "answer": f.answer, "text": f.text} for f in facts]


def _slug(run_name: str) -> str:
    """A directory name for a run: "npo/uoe@0.01" -> "npo-uoe-lr0.01", "ga/uoe+kpb" -> "ga-uoe-kpb"."""
    return run_name.replace("/", "-").replace("+", "-").replace("@", "-lr")


def _texts(facts: Sequence[Fact]) -> list[str]:
    """What unlearning trains on: every form of each fact the model was trained on."""
    return [t for f in facts for t in f.training_texts()]


def _retain_train_texts(facts: Sequence[Fact], seed: int) -> list[str]:
    """The retain split's training texts in a seeded random order. `unlearn` pairs forget batch k
    with retain batch k mod (number of retain batches), so with more retain than forget batches
    only the first ones are ever used; the split is ordered by domain, so unshuffled those would
    be (almost) one domain."""
    texts = _texts(facts)
    random.Random(seed).shuffle(texts)
    return texts


# -- table -------------------------------------------------------------------------------------

_COLUMNS = [("run", "name", "{}"), ("forget EM", "forget_em", "{:.3f}"), ("retain EM", "retain_em", "{:.3f}"),
            ("neighbor EM", "neighbor_em", "{:.3f}"), ("forget NLL", "forget_nll", "{:.2f}"),
            ("MIA AUC", "mia_auc", "{:.3f}"), ("overlap F/R", None, None), ("params trained", "trainable_params", "{:,}"),
            ("lr", "lr", "{:.0e}"), ("time s", "unlearn_seconds", "{:.1f}")]


def _cells(row: DemoRow) -> list[str]:
    out = []
    for _, attr, fmt in _COLUMNS:
        if attr is None:
            out.append(f"{row.overlap_forget:.3f}/{row.overlap_retain:.3f}")
            continue
        value = getattr(row, attr)
        out.append("-" if value is None else fmt.format(value))
    return out


def format_table(rows: Sequence[DemoRow], markdown: bool = False) -> str:
    head = [c[0] for c in _COLUMNS]
    body = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


# -- plots -------------------------------------------------------------------------------------

def _plot_summary(rows: Sequence[DemoRow], reports: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.5, 4), dpi=110)
    try:
        names = [r.name for r in rows]
        width = 0.27
        for k, (label, attr) in enumerate((("forget", "forget_em"), ("retain", "retain_em"),
                                           ("neighbor", "neighbor_em"))):
            ax1.bar([i + (k - 1) * width for i in range(len(rows))], [getattr(r, attr) for r in rows], width,
                    label=label)
        ax1.set_xticks(range(len(rows)), names, rotation=20)
        ax1.set_ylim(0, 1.05)
        ax1.set_ylabel("answer exact match")
        ax1.set_title("What the model still knows")
        ax1.legend()
        for i, (name, rep) in enumerate(reports.items()):
            if name == "original" or not rep.routing:
                continue
            color = f"C{i}"
            for split, style in (("forget", "-"), ("retain", "--")):
                r = rep.routing.get(split)
                if r is not None:
                    ax2.plot(r.layers, r.overlap, style, marker="o", color=color,
                             label=name if split == "forget" else None)
                    ax2.set_xticks(r.layers)
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_xlabel("MoE layer")
        ax2.set_ylabel("expert-selection overlap")
        ax2.set_title("Routing kept vs the original (solid forget, dashed retain)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # one entry per run
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _plot_tradeoff(rows: Sequence[DemoRow], path: Path) -> None:
    """Retain vs forget exact match of every run, one line per method/scope across learning rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    try:
        groups: dict[str, list[DemoRow]] = {}
        for r in rows:
            if r.method is not None:
                groups.setdefault(r.name.split("@")[0], []).append(r)
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda r: r.lr)
            ax.plot([r.forget_em for r in rs], [r.retain_em for r in rs], marker="o", label=name)
            for r in rs:
                ax.annotate(f"{r.lr:g}", (r.forget_em, r.retain_em), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        orig = rows[0]
        ax.scatter([orig.forget_em], [orig.retain_em], marker="*", s=120, color="k", label="original")
        ax.set_xlabel("forget exact match (lower = more forgotten)")
        ax.set_ylabel("retain exact match (higher = more kept)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title("Forgetting vs keeping, across learning rates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# -- output directory --------------------------------------------------------------------------

def _check_out_dir(out: Path) -> None:
    """The demo replaces its own previous output, never anything else."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_JSON).exists())):
        raise BadInputError(f"{out} exists and is not an earlier demo output (no {REPORT_JSON}); "
                            "choose another --out or remove it")


# -- the pipeline ------------------------------------------------------------------------------

def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore_checked(model: torch.nn.Module, snapshot: dict[str, torch.Tensor], run: str) -> None:
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]
    if changed:
        warnings.warn(f"{run}: reverting the patch left {len(changed)} tensors different from the original "
                      f"(e.g. {changed[0]}); restoring them from a copy", stacklevel=2)
        model.load_state_dict(snapshot)


def _row_from_report(name: str, report: Any, *, method=None, scope=None, lr=None, steps=0, params=0,
                     unlearn_seconds=0.0, eval_seconds=0.0, targets=(), target_layer=None,
                     retain_routing_weight=0.0, final_terms=None) -> DemoRow:
    s = report.splits
    routing = report.routing
    rr = routing["retain"]
    at_target = (rr.overlap[rr.layers.index(target_layer)] if target_layer is not None
                 and target_layer in rr.layers else None)
    return DemoRow(
        name=name, method=method, scope=scope, lr=lr, steps=steps,
        forget_em=s["forget"].exact_match, retain_em=s["retain"].exact_match,
        neighbor_em=s["neighbor"].exact_match, holdout_em=s["holdout"].exact_match,
        forget_nll=s["forget"].nll, retain_nll=s["retain"].nll, mia_auc=report.mia.auc["loss"],
        overlap_forget=routing["forget"].overlap_mean, overlap_retain=routing["retain"].overlap_mean,
        trainable_params=int(params), unlearn_seconds=round(unlearn_seconds, 2),
        eval_seconds=round(eval_seconds, 2), targets=list(targets), retain_routing_weight=retain_routing_weight,
        overlap_retain_target_layer=at_target, final_terms=dict(final_terms or {}))


def run_demo(out_dir: str | os.PathLike = "demo-output", quick: bool = False, rebuild: bool = False, *,
             cache_dir: str | os.PathLike | None = None, config: DemoConfig | None = None,
             sweep: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    """Build or load the benchmark model, attribute, unlearn (methods x scopes), evaluate, report.

    Writes under `out_dir` (replacing an earlier demo output there, all at once at the end):
    demo_report.json / .md (the table and every number), demo_summary.png, attribution.json/.png,
    runs/<name>/report.{json,md} + routing_overlap.png, patches/<method>-<scope>/ (apply them
    with `moe-unlearn evaluate --patch`). `cache_dir` overrides $MOE_UNLEARN_CACHE.
    `sweep` adds runs at SWEEP_LRS (rows "method/scope@lr", patches not kept) and demo_tradeoff.png:
    forget vs retain exact match across learning rates, which compares the scopes at similar
    forgetting rather than at one learning rate.
    """
    from moe_unlearn.attribution import attribute_experts
    from moe_unlearn.eval import evaluate, record_routing
    from moe_unlearn.unlearning import revert_patch, unlearn

    config = config or (DemoConfig.quick() if quick else DemoConfig())
    if sweep and not config.sweep_lrs:
        config = dataclasses.replace(config, sweep_lrs=SWEEP_LRS)
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)
    missing_lr = [m for m in config.methods if m not in config.lr]
    if missing_lr:
        raise BadInputError(f"DemoConfig.lr has no learning rate for {missing_lr}")
    t_start = time.perf_counter()

    log("[1/4] benchmark model: loading from the cache or training it")
    bench = load_or_build(config.bench, cache_root=cache_dir, rebuild=rebuild, progress=progress)
    t_model = time.perf_counter() - t_start
    model, tok, facts = bench.model, bench.tokenizer, bench.facts
    em = bench.meta["exact_match"]["trained"]
    log(f"      {'trained' if bench.built else 'loaded'} {bench.path} in {t_model:.1f} s: "
        f"{bench.meta['num_parameters']:,} parameters, knows {em:.1%} of {len(facts.trained)} trained facts "
        f"(forget {len(facts.forget)}, retain {len(facts.retain)}, neighbor {len(facts.neighbor)}, "
        f"holdout {len(facts.holdout)} never trained)")
    if em < config.bench.target_em:
        log(f"      WARNING: the model knows only {em:.1%} of its facts (target {config.bench.target_em:.0%})")

    retain_eval = list(facts.retain)
    if config.eval_retain is not None and len(retain_eval) > config.eval_retain:
        retain_eval = random.Random(config.seed).sample(retain_eval, config.eval_retain)
    eval_data = {"forget": _records(facts.forget), "retain": _records(retain_eval),
                 "neighbor": _records(facts.neighbor), "holdout": _records(facts.holdout)}
    # training data: the forget and retain SPLITS (every trained form of each fact), never the
    # evaluation sample `retain_eval` (a subset when eval_retain is set)
    forget_texts, retain_texts = _texts(facts.forget), _retain_train_texts(facts.retain, config.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, replace=True) as tmp:  # the whole report appears at once, or not at all
        log("[2/4] expert attribution on the forget split")
        t0 = time.perf_counter()
        attribution = attribute_experts(model, forget_texts, tokenizer=tok, batch_size=config.eval_batch_size,
                                         progress=progress)
        top = attribution.top(2)
        target = (top[0].layer, top[0].expert)
        attribution.to_json(tmp / "attribution.json")
        attribution.plot(tmp / "attribution.png")
        t_attr = time.perf_counter() - t0
        log(f"      target expert: layer {target[0]}, expert {target[1]} (affinity {top[0].score:.3f}; runner-up "
            f"layer {top[1].layer} expert {top[1].expert} {top[1].score:.3f}"
            f"{', NEAR TIE' if top[0].near_tie else ''}) in {t_attr:.1f} s")

        log("[3/4] evaluating the original model")
        t0 = time.perf_counter()
        original_routing = {name: record_routing(model, tok, eval_data[name], batch_size=config.eval_batch_size)
                            for name in ("forget", "retain", "neighbor")}
        common = dict(forget=eval_data["forget"], retain=eval_data["retain"], holdout=eval_data["holdout"],
                      extra_splits={"neighbor": eval_data["neighbor"]}, original_routing=original_routing,
                      target=target, batch_size=config.eval_batch_size, generate=config.generate,
                      progress=progress)
        reports = {"original": evaluate(model, tok, **common)}
        rows = [_row_from_report("original", reports["original"], eval_seconds=time.perf_counter() - t0,
                                 target_layer=target[0])]
        snapshot = _snapshot(model)

        kpb_scopes = [s for s in config.kpb_scopes if s in config.scopes] if config.kpb_weight else []
        variants = [(m, s, 0.0, f"{m}/{s}") for m in config.methods for s in config.scopes
                    ] + [(m, s, config.kpb_weight, f"{m}/{s}+kpb") for m in config.methods for s in kpb_scopes]
        variants.sort(key=lambda v: config.methods.index(v[0]))  # each method's rows together
        runs = [(m, s, config.lr[m], rrw, name) for m, s, rrw, name in variants]
        runs += [(m, s, lr, rrw, f"{name}@{lr:g}") for lr in config.sweep_lrs for m, s, rrw, name in variants
                 if lr != config.lr[m]]
        log(f"[4/4] unlearning: {len(runs)} runs ({len(config.methods)} methods x {len(config.scopes)} scopes"
            f"{f' + {len(config.methods) * len(kpb_scopes)} kpb' if kpb_scopes else ''}{' + lr sweep' if config.sweep_lrs else ''}), "
            f"{config.steps} steps each, batch {config.batch_size}, from the original weights every time")
        for method, scope, lr, rrw, name in runs:
            res = unlearn(model, forget_texts, retain_texts, tokenizer=tok, method=method, scope=scope,
                          target=target if scope in ("uoe", "topm") else None, steps=config.steps, lr=lr,
                          batch_size=config.batch_size, seed=config.seed, progress=progress,
                          retain_routing_weight=rrw, out_dir=tmp / "patches" / _slug(name))
            t0 = time.perf_counter()
            reports[name] = evaluate(model, tok, **common)
            t_eval = time.perf_counter() - t0
            revert_patch(model, res.patch_path)
            _restore_checked(model, snapshot, name)
            if "@" in name:  # keep the patches of the main runs only (a full-model patch is large)
                shutil.rmtree(res.patch_path, ignore_errors=True)
            rows.append(_row_from_report(name, reports[name], method=method, scope=scope, lr=lr,
                                         steps=config.steps, params=res.trainable_params,
                                         unlearn_seconds=res.wall_time, eval_seconds=t_eval,
                                         targets=res.targets, target_layer=target[0],
                                         retain_routing_weight=rrw, final_terms=res.final_terms))
            r = rows[-1]
            log(f"      {name:12s} forget EM {r.forget_em:.3f}  retain EM {r.retain_em:.3f}  neighbor EM "
                f"{r.neighbor_em:.3f}  ({r.trainable_params:,} params, {r.unlearn_seconds:.1f} s)")

        table = format_table(rows)
        seconds = {"model": round(t_model, 2), "attribution": round(t_attr, 2),
                   "total": round(time.perf_counter() - t_start, 2)}
        for name, rep in reports.items():
            rep.write_all(tmp / "runs" / _slug(name))
        _plot_summary([r for r in rows if "@" not in r.name], reports, tmp / "demo_summary.png")
        if config.sweep_lrs:
            _plot_tradeoff(rows, tmp / "demo_tradeoff.png")
        summary = {
            "rows": [asdict(r) for r in rows], "target": list(target), "target_near_tie": top[0].near_tie,
            "model_path": str(bench.path), "model_built": bench.built, "model_meta": bench.meta,
            "config": config.to_dict(), "seconds": seconds, "device": _device_name(),
            "notes": {"mia_auc": "LOSS attack on the answer tokens, forget (members) vs holdout (never trained); "
                                 "0.5 = indistinguishable",
                      "overlap": "mean over MoE layers and tokens of the fraction of each token's top-k experts "
                                 "kept vs the original model (forget / retain)",
                      "lr": "one learning rate per method, the same for every scope",
                      "kpb": "+kpb rows: uoe plus knowledge-preserving expert balancing, i.e. "
                             f"retain_routing_weight={config.kpb_weight:g} x KL(original || current routing) "
                             "on retain tokens at the trained router; otherwise identical to the uoe row",
                      "retain_data": "every run gets the retain split's training texts (seeded shuffle); GA "
                                     "uses them only for the kpb term, NPO adds alpha=1 x retain NLL in every run",
                      "overlap_retain_target_layer": "retain overlap at the SEUF target layer alone (where "
                                                     "the uoe router trains and the kpb term acts)"},
        }
        write_json(tmp / REPORT_JSON, summary)
        write_text(tmp / REPORT_MD, _markdown(rows, target, bench, config, seconds))
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    log("")
    log(table)
    log(f"\nreports in {out} ({seconds['total']:.1f} s in all)")
    return DemoResult(rows=rows, table=table, out_dir=out, model_path=bench.path, model_built=bench.built,
                      target=target, target_near_tie=top[0].near_tie, model_exact_match=em, seconds=seconds)


def _device_name() -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


def _markdown(rows: Sequence[DemoRow], target: tuple[int, int], bench: Any, config: DemoConfig,
              seconds: dict[str, float]) -> str:
    facts = bench.facts
    lines = [
        "# moe-unlearn demo", "",
        f"Model: {bench.path.name} ({bench.meta['num_parameters']:,} parameters, Qwen3-MoE, "
        f"{config.bench.num_experts} experts top-{config.bench.top_k}, {config.bench.num_layers} layers), "
        f"knows {bench.meta['exact_match']['trained']:.1%} of its {len(facts.trained)} trained facts.",
        f"Forget: domain `{config.bench.facts.forget_domain}` ({len(facts.forget)} facts); retain "
        f"{len(facts.retain)} facts (evaluated on {min(len(facts.retain), config.eval_retain or len(facts.retain))}); "
        f"neighbor {len(facts.neighbor)}; holdout {len(facts.holdout)} (never trained).",
        f"SEUF target expert: layer {target[0]}, expert {target[1]}.",
        f"Every run: {config.steps} steps, batch {config.batch_size}, from the original weights; "
        "one learning rate per method for all scopes.", "",
        format_table(rows, markdown=True), "",
        "EM = answer exact match (greedy); MIA AUC = LOSS attack, forget vs holdout (0.5 = indistinguishable); "
        "overlap F/R = expert-selection overlap with the original model on forget / retain tokens.",
        (f"`+kpb` = uoe with knowledge-preserving expert balancing: retain_routing_weight {config.kpb_weight:g} "
         "x KL(original || current routing) on retain tokens at the target layer's router. "
         if any(r.retain_routing_weight for r in rows) else "")
        + "NPO runs carry NPO's retain NLL term (alpha 1); GA runs use retain data only for a kpb term.", "",
        f"Time: model {seconds['model']:.1f} s ({'trained' if bench.built else 'cached'}), "
        f"attribution {seconds['attribution']:.1f} s, total {seconds['total']:.1f} s.", "",
    ]
    return "\n".join(lines)


__all__ = ["DemoConfig", "DemoResult", "DemoRow", "format_table", "run_demo"]
