"""The frontier harness: methods x variants x learning rates x seeds x step counts on a bench model.

    result = run_frontier(FrontierConfig(model="natural"), out_dir="benchmarks/results")

One comparison at one learning rate says nothing (a scope that forgets less also keeps more),
so every variant runs over a learning-rate grid, several seeds, and is read at matched
forgetting: for each method and variant, the best median utility EM among learning rates whose
median forget EM is at most the guess level (the original model's EM on never-trained holdout
facts) + 0.05.

What each run sees and what is measured (splits of `moe_unlearn.bench_model.facts`):
- unlearning gets the forget facts (QA record, answer-only loss, + first statement) and the
  retain_train facts (same forms) as its retain data; nothing else;
- utility EM / NLL on the utility split (trained facts no unlearning sees: the main utility
  number), neighbor EM (close to the forget set, never given to unlearning), holdout EM (never
  trained: the guess level), forget EM / NLL, expert-selection overlap with the original model
  on forget and retain_train tokens (and on utility tokens).
- Step counts: one trajectory per (method, variant, lr, seed) runs to the largest step count
  with a constant learning rate and is evaluated at every step count on the way; with a constant
  schedule the weights at step 40 of a 120-step run are those of a 40-step run (tested).

Results: `frontier_<model>.json` (every run; resumable: runs already there are skipped),
`frontier_<model>.md` (the matched-forgetting summary), `frontier_<model>.png` (median forget EM vs
median utility EM per variant, one curve over learning rates, seed spread as bars).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_unlearn.atomic import write_json, write_text
from moe_unlearn.errors import BadInputError, DataError, TrainingDiverged
from moe_unlearn.training import TrainHooks
from moe_unlearn.validate import MAX_ITEMS, MAX_SEEDS, MAX_STEPS, MAX_TOKENS, bounded

MATCH_MARGIN = 0.05  # "forgotten" = median forget EM <= guess level + this
PROBES = ("replay", "paraphrase", "relearn")
PROBE_KEYS = ("forget_em_replay", "paraphrase_em", "completion_em", "relearn_relative_to_reference")


@dataclass(frozen=True)
class Variant:
    """One way to run a method: a scope, how the target is chosen, and extra `unlearn` options.

    targets: "seuf" = the single highest-affinity routed expert (UOE); "coverage" = the experts
    `select_targets` picks until they cover COVERAGE of the forget tokens; None = no target."""

    name: str
    scope: str
    targets: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Make a variant available to the harness and the CLI by name (later methods add theirs)."""
    VARIANTS[variant.name] = variant
    return variant


register_variant(Variant("full", "full", doc="every parameter trains (the usual baseline)"))
register_variant(Variant("uoe", "uoe", "seuf", doc="UOE/SEUF: the top-affinity expert and its router, router anchor"))
register_variant(Variant("uoe+kpb", "uoe", "seuf", {"retain_routing_weight": 1.0},
                         doc="uoe plus knowledge-preserving balancing: KL(original || current routing) on retain "
                             "tokens at the trained router, weight 1.0 (= the anchor's weight)"))

# MoE-aware variants (see moe_unlearn.unlearning.projection and .trace)
GRIP = {"router_projection": "grip"}
NULL = {"expert_projection": "retain_null"}
COVERAGE = 0.8
register_variant(Variant("uoe+grip", "uoe", "seuf", GRIP, doc="uoe, router change projected off the retain inputs"))
register_variant(Variant("uoe+null", "uoe", "seuf", NULL, doc="uoe, expert change projected off the retain span"))
register_variant(Variant("uoe+grip+null", "uoe", "seuf", {**GRIP, **NULL}, doc="uoe with both projections"))
register_variant(Variant("uoe+trace", "uoe", "seuf", {"retain_weighting": "trace"},
                         doc="uoe, retain loss reweighted toward the target's forget frequency (TRACE)"))
register_variant(Variant("cov", "topm", "coverage", doc=f"the experts covering {COVERAGE:.0%} of forget tokens"))
register_variant(Variant("cov+grip+null", "topm", "coverage", {**GRIP, **NULL},
                         doc="coverage targets with both projections"))
register_variant(Variant("full+grip", "full", None, GRIP, doc="full model, every router's change projected"))
# low-rank adapters on the UOE target's matrices (moe_unlearn.unlearning.adapters); the router trains in full
ADAPTER_RANKS = (1, 4, 16)
for _r in ADAPTER_RANKS:
    register_variant(Variant(f"uoe+lora{_r}", "uoe", "seuf", {"adapter": "lora", "adapter_rank": _r},
                             doc=f"uoe with a rank-{_r} adapter B A on each of the target's matrices"))

# Learning-rate grids, never chosen on the evaluation splits: half-decade steps, the same for every
# method; the one-expert scopes train ~100x fewer parameters and need larger steps to move at all,
# so their grid sits higher. Both were first five points (1e-4..1e-2 and 3e-4..3e-2); the first
# results put the best full-model point at the low end and the best one-expert point at the high
# end, so each grid was extended by one point in that direction, for every method alike.
FULL_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
EXPERT_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def default_lrs(variant: str) -> tuple[float, ...]:
    return FULL_LRS if VARIANTS[variant].scope == "full" else EXPERT_LRS


@dataclass
class FrontierConfig:
    """What the harness runs. lrs: {variant: grid}; a variant without an entry uses default_lrs."""

    model: str = "natural"
    methods: tuple[str, ...] = ("npo", "graddiff", "ga", "rmu")
    variants: tuple[str, ...] = ("full", "uoe", "uoe+kpb")
    lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    steps: tuple[int, ...] = bounded((40, 120), low=1, high=MAX_STEPS, max_len=MAX_SEEDS)
    seeds: tuple[int, ...] = bounded((0, 1, 2), low=0, max_len=MAX_SEEDS)
    batch_size: int = bounded(16, low=1, high=MAX_ITEMS)
    max_length: int = bounded(64, low=2, high=MAX_TOKENS)
    eval_batch_size: int = bounded(64, low=1, high=MAX_ITEMS)
    quick: bool = False  # the tiny test bench model instead of the real one
    # extra measurements per run (see moe_unlearn.eval.replay / .relearn): "replay" (forget EM / NLL
    # with the original routing forced), "paraphrase" (second-question and completion EM),
    # "relearn" (held-forget EM while fine-tuning on a part of the forget facts; costly: only at the
    # largest step count and only for the variants in relearn_variants, all when empty)
    probes: tuple[str, ...] = ()
    relearn_variants: tuple[str, ...] = ()
    realization: int = bounded(0, low=0)  # which build of the bench recipe (moe_unlearn.bench_model.realize)
    grad_accum: int = bounded(1, low=1, high=MAX_ITEMS)  # micro-batches per optimizer step (per rank)
    # "fsdp2" (under torchrun): the model sharded over the ranks (moe_unlearn.sharding), each rank
    # training on its share of every step's micro-batches; equal to one process with grad_accum
    # multiplied by the number of ranks
    shard: str | None = None

    def grid(self, variant: str) -> tuple[float, ...]:
        return tuple(self.lrs.get(variant, default_lrs(variant)))

    def validate(self) -> None:
        """Every field against its declared type, then its value; all before any model loads."""
        from moe_unlearn.bench_model import BENCH_MODELS
        from moe_unlearn.unlearning.objectives import OBJECTIVES
        from moe_unlearn.validate import check_fields, check_int

        check_fields(self)
        for name in ("batch_size", "max_length", "eval_batch_size", "grad_accum"):
            check_int(name, getattr(self, name), low=1)
        for s in self.seeds:
            check_int("seeds", s, low=0)

        if self.model not in BENCH_MODELS:
            raise BadInputError(f"unknown bench model {self.model!r}; choose one of {', '.join(BENCH_MODELS)}")
        bad = [m for m in self.methods if m not in OBJECTIVES]
        if bad or not self.methods:
            raise BadInputError(f"unknown method(s) {bad}; known: {', '.join(OBJECTIVES)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise BadInputError(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
        if not self.steps or any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise BadInputError(f"steps must be positive integers, got {list(self.steps)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BadInputError(f"give at least one seed, each once; got {list(self.seeds)}")
        if not isinstance(self.realization, int) or self.realization < 0:
            raise BadInputError(f"realization must be an integer >= 0, got {self.realization!r}")
        bad = [p for p in self.probes if p not in PROBES]
        if bad:
            raise BadInputError(f"unknown probe(s) {bad}; known: {', '.join(PROBES)}")
        bad = [v for v in self.relearn_variants if v not in self.variants]
        if bad:
            raise BadInputError(f"relearn_variants {bad} are not among the variants run ({', '.join(self.variants)})")
        if self.shard is not None:
            from moe_unlearn.sharding import SHARD_MODES

            if self.shard not in SHARD_MODES:
                raise BadInputError(f"shard must be one of {', '.join(SHARD_MODES)} or None, got {self.shard!r}")
            whole = [v for v in self.variants if VARIANTS[v].scope == "full"]
            if whole or "relearn" in self.probes:
                raise BadInputError(f"shard={self.shard!r} keeps only the trained experts whole: "
                                    + (f"variant(s) {whole} train every parameter" if whole else
                                       "the relearn probe fine-tunes every parameter") + "; leave them out")
        for v in self.variants:
            g = self.grid(v)
            if not g or any(not (isinstance(x, (int, float)) and 0 < x < 1) for x in g):
                raise BadInputError(f"learning rates of {v} must be numbers in (0, 1), got {list(g)}")


def run_key(run: dict[str, Any]) -> tuple:
    return (run["method"], run["variant"], float(run["lr"]), int(run["seed"]), int(run["steps"]))


# -- evaluation ---------------------------------------------------------------------------------

class _Evaluator:
    """Scores the model on every split the frontier reports, against the original routing."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, facts: Any, batch_size: int,
                 probes: Sequence[str] = ()) -> None:
        from moe_unlearn.bench_model import completion_records, paraphrase_records, qa_records
        from moe_unlearn.eval import record_routing

        self.model, self.tok, self.batch_size, self.probes = model, tokenizer, batch_size, tuple(probes)
        self.data = {name: qa_records(facts.splits[name])
                     for name in ("forget", "utility", "neighbor", "holdout", "retain_train")}
        self.probe_data: dict[str, Any] = {}
        if "paraphrase" in self.probes:
            self.probe_data = {"extra": {"forget_paraphrase": paraphrase_records(facts.forget)},
                               "completion": completion_records(facts.forget)}
        self.routing = {name: record_routing(model, tokenizer, self.data[name], batch_size=batch_size)
                        for name in ("forget", "retain_train", "utility")}

    def __call__(self) -> dict[str, float]:
        from moe_unlearn.eval import evaluate

        rep = evaluate(self.model, self.tok, forget=self.data["forget"], holdout=self.data["holdout"],
                       extra_splits={**{k: self.data[k] for k in ("utility", "neighbor", "retain_train")},
                                     **self.probe_data.get("extra", {})},
                       completion=self.probe_data.get("completion"),
                       replay="original" if "replay" in self.probes else None,
                       original_routing=self.routing, batch_size=self.batch_size, generate=False, progress=False)
        s, r = rep.splits, rep.routing
        probes = {}
        if "replay" in self.probes:
            probes.update(forget_em_replay=s["forget_replay"].exact_match, forget_nll_replay=s["forget_replay"].nll)
        if "paraphrase" in self.probes:
            probes.update(paraphrase_em=s["forget_paraphrase"].exact_match, completion_em=s["completion"].exact_match)
        return {**probes, "forget_em": s["forget"].exact_match, "utility_em": s["utility"].exact_match,
                "neighbor_em": s["neighbor"].exact_match, "holdout_em": s["holdout"].exact_match,
                "retain_train_em": s["retain_train"].exact_match, "forget_nll": s["forget"].nll,
                "utility_nll": s["utility"].nll, "overlap_forget": r["forget"].overlap_mean,
                "overlap_retain": r["retain_train"].overlap_mean, "overlap_utility": r["utility"].overlap_mean,
                "overlap_retain_per_layer": [round(x, 4) for x in r["retain_train"].overlap],
                "mia_auc_loss": rep.mia.auc["loss"] if rep.mia is not None else None}


class _EvalAt(TrainHooks):
    """Evaluates the model after the given optimizer steps (training time counted without it)."""

    def __init__(self, steps: Sequence[int], evaluate: Callable[[], dict[str, float]]) -> None:
        self.steps, self.evaluate = set(steps), evaluate
        self.results: dict[int, dict[str, float]] = {}
        self.t0 = time.perf_counter()
        self.eval_time = 0.0

    def after_step(self, step: int) -> None:
        if step in self.steps:
            t = time.perf_counter()
            self.results[step] = {**self.evaluate(), "seconds": round(t - self.t0 - self.eval_time, 2)}
            self.eval_time += time.perf_counter() - t


class _RelearnProbe:
    """The relearning probe of moe_unlearn.eval.relearn on a bench model: fine-tune on a fixed 15% of
    the forget facts (QA + first statement), score the other forget facts; the original's and the
    retrained reference's curves are measured once per results file."""

    def __init__(self, facts: Any, tokenizer: Any) -> None:
        from moe_unlearn.bench_model import qa_records, unlearning_records
        from moe_unlearn.eval.relearn import RelearnConfig, split_indices

        self.config = RelearnConfig()
        tr, held = split_indices(len(facts.forget), self.config.fraction, self.config.seed)
        self.train = unlearning_records([facts.forget[i] for i in tr])
        self.held = qa_records([facts.forget[i] for i in held])
        self.tok = tokenizer

    def curve(self, model: torch.nn.Module) -> dict[str, Any]:
        from moe_unlearn.eval.relearn import relearn_curve

        return relearn_curve(model, self.tok, self.train, self.held, self.config).to_dict()

    def baselines(self, model: torch.nn.Module, config: FrontierConfig, cache_dir: Any, progress: bool) -> dict:
        from dataclasses import asdict

        from moe_unlearn.bench_model import bench_config, load_or_build

        ref = load_or_build(bench_config(config.model, quick=config.quick, retrained=True,
                                         realization=config.realization), cache_root=cache_dir,
                            progress=progress)
        orig, refc = self.curve(model), self.curve(ref.model)
        level = 0.5 * orig["em"][0]
        return {"config": asdict(self.config), "n_train_facts": len(self.train) // 2, "n_held_facts": len(self.held),
                "original": orig, "reference": refc, "level": level, "reference_steps_to_half": _steps_to(refc, level)}

    def run(self, model: torch.nn.Module, base: dict[str, Any] | None) -> dict[str, Any]:
        curve = self.curve(model)
        if not base:
            return {"relearn_curve": curve}
        steps, ref = _steps_to(curve, base["level"]), base["reference_steps_to_half"]
        rel = None if steps is None else round(steps / (ref if ref is not None else self.config.steps + 1), 4)
        return {"relearn_curve": curve, "relearn_steps_to_half": steps, "relearn_relative_to_reference": rel}


def _steps_to(curve: dict[str, Any], level: float) -> int | None:
    return next((s for s, e in zip(curve["steps"], curve["em"], strict=True) if e >= level - 1e-12), None)


# -- specialisation ---------------------------------------------------------------------------

def specialisation(attribution: Any) -> dict[str, Any]:
    """Does the forget domain sit in one expert? The SEUF target's coverage and selectivity, and
    per layer the top-affinity expert's coverage (forget selection frequency) and selectivity."""
    p = attribution.premise(warn=False)
    sel = attribution.selectivity
    per_layer = []
    for r, layer in enumerate(attribution.layers):
        e = int(torch.argmax(attribution.affinity[r]))
        per_layer.append({"layer": layer, "expert": e, "affinity": round(float(attribution.affinity[r, e]), 4),
                          "coverage": round(float(attribution.frequency[r, e]), 4),
                          "selectivity": round(float(sel[r, e]), 3) if sel is not None else None})
    return {"target": list(p.targets[0]), "coverage": round(p.coverage, 4),
            "selectivity": round(p.selectivity[0], 3) if p.selectivity else None, "premise_holds": p.holds,
            "per_layer": per_layer}


# -- the harness --------------------------------------------------------------------------------

@dataclass
class FrontierResult:
    path: Path
    data: dict[str, Any]
    summary: str


def results_path(out_dir: str | Path, model: str, quick: bool = False, realization: int = 0) -> Path:
    return Path(out_dir) / f"frontier_{model}{f'_r{realization}' if realization else ''}{'_quick' if quick else ''}.json"


def protocol(config: FrontierConfig) -> dict[str, Any]:
    """What every run of one results file shares; a resumed run must have the same, or its runs would be
    mixed with runs of another protocol."""
    from moe_unlearn.distributed import world

    step = config.grad_accum * (world()[1] if config.shard else 1)  # micro-batches per optimizer step, all ranks
    return {**({"micro_batches_per_step": step} if step != 1 else {}),
            "batch_size": config.batch_size, "max_length": config.max_length,
            "lr_schedule": "constant", "loss_tokens": "answer", "match_margin": MATCH_MARGIN,
            "unlearning_data": "forget: QA (answer-only) + first statement per fact; retain: "
                               "retain_train facts in the same forms"}


_RUN_FIELDS = {"method": str, "variant": str, "lr": float, "seed": int, "steps": int}
_RUN_METRICS = ("forget_em", "utility_em", "neighbor_em", "overlap_retain")


def read_results(path: str | Path) -> dict[str, Any]:
    """A frontier results file, checked: a JSON object with the model, protocol and a list of runs, each run a
    mapping whose key fields are typed (method, variant: strings; lr: a positive finite number; seed, steps:
    integers) and whose EM / overlap metrics are numbers in [0, 1] unless the run diverged. DataError otherwise
    (a RecursionError, a FIFO or a damaged run never gets further)."""
    from moe_unlearn.validate import check_type, read_json_file

    path = Path(path)
    data = read_json_file(path, what="frontier results file", allow_nonfinite=True)
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not isinstance(data.get("runs"), list) \
            or not isinstance(data.get("protocol", {}), dict):
        raise DataError(f"{path} is not a frontier results file (model, protocol and runs expected); move it away "
                        "or choose another --out")
    for i, run in enumerate(data["runs"]):
        try:
            if not isinstance(run, dict):
                raise BadInputError(f"is a {type(run).__name__}, not a mapping")
            for key, kind in _RUN_FIELDS.items():
                if key not in run:
                    raise BadInputError(f"has no {key}")
                check_type(key, run[key], kind)
            if not run["lr"] > 0 or run["seed"] < 0 or run["steps"] < 1:
                raise BadInputError("needs lr > 0, seed >= 0 and steps >= 1")
            if not run.get("diverged"):
                for key in _RUN_METRICS:
                    value = check_type(key, run.get(key), float)
                    if not 0.0 <= value <= 1.0:
                        raise BadInputError(f"{key} = {value} is not in [0, 1]")
        except BadInputError as exc:
            raise DataError(f"{path}: run {i} is malformed ({exc}); the file is damaged, move it away") from None
    return data


def _load_existing(path: Path, config: FrontierConfig) -> dict[str, Any] | None:
    """The results of an earlier run to resume, or None; refused unless model, quick and the whole protocol are
    this run's."""
    if not path.exists() and not path.is_symlink():
        return None
    data = read_results(path)
    if data["model"] != config.model or bool(data.get("quick")) != config.quick:
        raise DataError(f"{path} is not a frontier result of model {config.model!r}{' (quick)' if config.quick else ''}"
                        f" (it holds model {data['model']!r}{' (quick)' if data.get('quick') else ''}); move it away or "
                        "choose --out")
    want, there = protocol(config), data.get("protocol", {})
    diff = sorted(k for k in set(want) | set(there) if want.get(k) != there.get(k))
    if diff:
        raise DataError(f"{path} holds runs of another protocol ("
                        + ", ".join(f"{k}: {there.get(k)!r} there, {want.get(k)!r} now" for k in diff)
                        + "); resume with the same settings, or choose another --out")
    return data


@contextmanager
def results_lock(path: str | Path) -> Iterator[None]:
    """Hold the lock of a results file while a run or a merge writes it: a second writer of the same file
    fails at once (BadInputError) instead of both running and the last one overwriting the other's runs. The
    lock is an flock on `.<name>.lock` beside the file (released by the kernel even when the holder is killed;
    the empty lock file stays)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(f"another process is writing {path} (it holds {lock}); wait for it to finish or "
                                "choose another --out") from None
        yield
    finally:
        os.close(fd)


def run_frontier(config: FrontierConfig, out_dir: str | Path = "benchmarks/results", *,
                 cache_dir: str | Path | None = None, progress: bool = False,
                 log: Callable[[str], None] = print) -> FrontierResult:
    """Run every missing (method, variant, lr, seed) trajectory into `out_dir`'s results file, holding its
    lock (`results_lock`) throughout, so a second run on the same file is refused instead of racing it."""
    from moe_unlearn.distributed import world

    config.validate()
    ranks = world()[1]
    if (ranks > 1) != bool(config.shard):
        raise BadInputError("the frontier runs in one process, or sharded over the ranks of torchrun with "
                            "shard='fsdp2' (--shard fsdp2)" if ranks > 1 else
                            f"shard={config.shard!r} shards over several processes: launch with torchrun "
                            "--nproc_per_node N")
    with _lock_on_main(results_path(out_dir, config.model, config.quick, config.realization)):
        return _run_frontier(config, out_dir, cache_dir=cache_dir, progress=progress, log=log)


@contextmanager
def _lock_on_main(path: Path) -> Iterator[None]:
    """`results_lock`, held by rank 0 for all the ranks (which fail together when it is taken)."""
    from contextlib import ExitStack

    from moe_unlearn.distributed import on_main

    with ExitStack() as stack:
        on_main(lambda: stack.enter_context(results_lock(path)))
        yield


def _run_frontier(config: FrontierConfig, out_dir: str | Path = "benchmarks/results", *,
                  cache_dir: str | Path | None = None, progress: bool = False,
                  log: Callable[[str], None] = print) -> FrontierResult:
    """Run every missing (method, variant, lr, seed) trajectory, evaluating at each step count;
    the JSON is rewritten (atomically) after every trajectory, so an interrupted run resumes."""
    from moe_unlearn.attribution import attribute_experts, select_targets
    from moe_unlearn.bench_model import bench_config, load_or_build, unlearning_records
    from moe_unlearn.distributed import is_main, on_main, world
    from moe_unlearn.unlearning import unlearn

    config.validate()
    main = is_main()
    if not main:  # rank 0 logs and writes the files for all
        log, progress = (lambda _: None), False
    path = results_path(out_dir, config.model, config.quick, config.realization)
    data = on_main(lambda: _load_existing(path, config))
    bench_cfg = bench_config(config.model, quick=config.quick, realization=config.realization)
    if world()[1] > 1:  # built (or copied into the cache) once, by rank 0
        on_main(lambda: load_or_build(bench_cfg, cache_root=cache_dir, progress=progress) and None)
    bench = load_or_build(bench_cfg, cache_root=cache_dir, progress=progress)
    model, tok, facts = bench.model, bench.tokenizer, bench.facts
    forget, retain = unlearning_records(facts.forget), unlearning_records(facts.retain_train)
    t0 = time.perf_counter()
    evaluator = _Evaluator(model, tok, facts, config.eval_batch_size, config.probes)
    relearn = _RelearnProbe(facts, tok) if "relearn" in config.probes else None
    attr = attribute_experts(model, forget, tokenizer=tok, retain=retain, batch_size=config.eval_batch_size,
                             progress=False)
    target = attr.target()
    cover = select_targets(attr, coverage=COVERAGE, warn=False)
    recorded = (data or {}).get("bench_model", {}).get("path_name")
    if recorded is not None and recorded != bench.path.name:  # runs on other weights must not mix with these
        raise DataError(f"{path} holds runs on bench model {recorded}, not {bench.path.name} (another recipe or "
                        "build); move it away or choose another --out")
    if data is None:
        original = evaluator()
        data = {"model": config.model, "quick": config.quick, "device": device_name(),
                "realization": config.realization,
                "bench_model": {"path_name": bench.path.name, "config": bench.meta["config"],
                                "weights_sha256": bench.meta.get("weights_sha256"),
                                "matches_shipped": bench.meta.get("matches_shipped"),
                                "num_parameters": bench.meta["num_parameters"],
                                "exact_match": bench.meta["exact_match"]},
                "guess_level": original["holdout_em"], "original": original,
                "specialisation": specialisation(attr), "target": list(target),
                "coverage_targets": {"coverage": COVERAGE, "targets": [list(t) for t in cover],
                                     "reached": round(attr.coverage(cover), 4)},
                "split_sizes": {k: len(v) for k, v in facts.splits.items()},
                "protocol": protocol(config),
                "runs": []}
        log(f"original: forget EM {original['forget_em']:.3f}, utility EM {original['utility_em']:.3f}, guess level "
            f"{original['holdout_em']:.3f}; target {target}, coverage {data['specialisation']['coverage']:.2f}, selectivity "
            f"{data['specialisation']['selectivity']}")
    if relearn is not None and "relearn" not in data:  # the original's and the retrained reference's curves
        data["relearn"] = relearn.baselines(model, config, cache_dir, progress)
    if config.shard:  # every layer sharded, whole on each rank what any of the runs trains
        _shard_for_runs(model, config, target, cover)
    done = {run_key(r) for r in data["runs"]}
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # seed-major order: an interrupted run leaves whole grids for the first seeds, not whole methods
    todo = [(m, v, lr, s) for s in config.seeds for m in config.methods for v in config.variants
            for lr in config.grid(v) if any((m, v, float(lr), int(s), int(n)) not in done for n in config.steps)]
    log(f"frontier {config.model}: {len(todo)} trajectories to run ({len(data['runs'])} runs already in {path})")
    for i, (method, vname, lr, seed) in enumerate(todo, 1):
        variant = VARIANTS[vname]
        hook = _EvalAt(config.steps, evaluator)
        diverged = None
        try:
            res = unlearn(model, forget, retain, tokenizer=tok, method=method, scope=variant.scope,
                          target={"seuf": [target], "coverage": cover}.get(variant.targets),
                          steps=max(config.steps), lr=lr,
                          batch_size=config.batch_size, max_length=config.max_length, seed=seed,
                          grad_accum=config.grad_accum, shard=config.shard, progress=progress, callbacks=[hook],
                          **variant.options)
            params, targets = res.trainable_params, res.targets
        except TrainingDiverged as exc:  # a NaN/inf loss: the steps evaluated before it still count
            diverged, params, targets = str(exc), None, None
        if relearn is not None and not diverged and (not config.relearn_variants or vname in config.relearn_variants):
            hook.results[max(config.steps)].update(relearn.run(model, data.get("relearn")))
        model.load_state_dict(snapshot)  # every run starts from the original weights
        for n in config.steps:
            if (method, vname, float(lr), int(seed), int(n)) in done:
                continue
            metrics = hook.results.get(n) or {"diverged": diverged}
            data["runs"].append({"method": method, "variant": vname, "scope": variant.scope, "lr": float(lr),
                                 "steps": int(n), "seed": int(seed), **metrics, "trainable_params": params,
                                 "targets": targets, **({"details": res.details} if not diverged and res.details
                                                        else {})})
        if main:
            write_json(path, data)
        last = hook.results.get(max(config.steps))
        log(f"[{i}/{len(todo)}] {method}/{vname} lr {lr:g} seed {seed}: "
            + (f"forget EM {last['forget_em']:.3f} utility EM {last['utility_em']:.3f} ({last['seconds']:.1f} s)"
               if last else f"diverged ({diverged})"))
    summary = summarize(data)
    if main:
        write_text(path.with_suffix(".md"), summary)
        plot_frontier(data, path.with_suffix(".png"))
    log(f"frontier {config.model}: {len(data['runs'])} runs in {path} ({time.perf_counter() - t0:.0f} s)")
    return FrontierResult(path=path, data=data, summary=summary)


def _shard_for_runs(model: torch.nn.Module, config: FrontierConfig, target: Any, cover: Any) -> None:
    """Shard `model` with FSDP2 once for every run of `config`: the parameters any (method, variant)
    trains stay whole on each rank (each run's unlearn() checks its own)."""
    from moe_unlearn.sharding import shard_model, trained_parameters
    from moe_unlearn.unlearning.config import UnlearnConfig
    from moe_unlearn.unlearning.engine import trained_names

    names: set[str] = set()
    for method in config.methods:
        for vname in config.variants:
            v = VARIANTS[vname]
            run = UnlearnConfig.build(method=method, scope=v.scope, steps=1,
                                      target={"seuf": [target], "coverage": cover}.get(v.targets), **v.options)
            names.update(trained_names(model, run))
    shard_model(model, trained_parameters(model, sorted(names)))


def merge_results(target: str | Path, sources: Sequence[str | Path], *, variants: Sequence[str] | None = None
                  ) -> dict[str, Any]:
    """Add the runs of other results files of the same bench model (e.g. written by a second process
    with other variants) to `target`, skipping runs it already has (and, with `variants`, runs of other
    variants); rewrites target's .json, .md and .png."""
    target = Path(target)
    with results_lock(target):
        return _merge_results(target, sources, variants)


def _merge_results(target: Path, sources: Sequence[str | Path], variants: Sequence[str] | None) -> dict[str, Any]:
    data = read_results(target)
    have = {run_key(r) for r in data["runs"]}
    for src in sources:
        other = read_results(src)
        if other.get("protocol") != data.get("protocol"):
            raise DataError(f"{src} was run with another protocol than {target}; its runs cannot be merged")
        if other.get("model") != data["model"] or other.get("quick") != data.get("quick"):
            raise DataError(f"{src} is a frontier of model {other.get('model')!r}, not {data['model']!r}")
        if other.get("target") != data.get("target"):
            raise DataError(f"{src} unlearned target {other.get('target')}, {target} {data.get('target')}")
        for r in other["runs"]:
            if run_key(r) not in have and (variants is None or r["variant"] in variants):
                data["runs"].append(r)
                have.add(run_key(r))
        data.setdefault("coverage_targets", other.get("coverage_targets"))
    write_json(target, data)
    write_text(target.with_suffix(".md"), summarize(data))
    plot_frontier(data, target.with_suffix(".png"))
    return data


# -- reading the results ---------------------------------------------------------------------------

def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def curves(data: dict[str, Any]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """{(method, variant, steps): [per lr: medians and seed ranges of forget/utility/neighbor EM]}."""
    groups: dict[tuple[str, str, int, float], list[dict[str, Any]]] = {}
    for r in data["runs"]:
        if r.get("diverged"):  # no weights to evaluate: reported in the summary's divergence count
            continue
        groups.setdefault((r["method"], r["variant"], r["steps"], r["lr"]), []).append(r)
    out: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for (m, v, n, lr), rs in sorted(groups.items()):
        point = {"lr": lr, "seeds": len(rs)}
        for key in ("forget_em", "utility_em", "neighbor_em", "overlap_retain"):
            vals = [r[key] for r in rs]
            point[key] = _median(vals)
            point[key + "_range"] = (min(vals), max(vals))
        for key in PROBE_KEYS:  # probe fields, in runs that measured them
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                point[key] = _median(vals)
        out.setdefault((m, v, n), []).append(point)
    return out


def matched(data: dict[str, Any], margin: float = MATCH_MARGIN, *,
            erased: bool = False) -> dict[tuple[str, str, int], dict | None]:
    """Per (method, variant, steps): the lr point with the best median utility EM among those whose
    median forget EM <= guess level + margin (None when no learning rate forgets that much). With
    `erased`, the forget level is max(forget EM, forget EM under the original routing) where replay was
    measured: forgetting that the original routing undoes does not count."""
    level = data["guess_level"] + margin

    best: dict[tuple[str, str, int], dict | None] = {}
    for key, points in curves(data).items():
        ok = [p for p in points if _forget_level(p, erased) <= level + 1e-12]
        best[key] = max(ok, key=lambda p: (p["utility_em"], -p["lr"])) if ok else None
    return best


def _forget_level(p: dict[str, Any], erased: bool) -> float:
    """A point's forget EM, or with `erased` max(forget EM, forget EM under the original routing) where
    replay was measured (forgetting the original routing undoes does not count)."""
    return max(p["forget_em"], p.get("forget_em_replay", p["forget_em"])) if erased else p["forget_em"]


def interpolated(data: dict[str, Any], margin: float = MATCH_MARGIN, *,
                 erased: bool = False) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Per (method, variant, steps): utility EM read off the variant's frontier at one forget level,
    forget EM = guess level + margin.

    The frontier is the piecewise-linear curve through the learning-rate points (median forget EM,
    median utility EM) in increasing learning rate. At the first segment whose two ends lie on
    either side of the level (or a point exactly on it), utility is interpolated linearly in forget
    EM: u = u_a + (f_a - level) / (f_a - f_b) * (u_b - u_a). Every variant is so read at the same
    forget EM, instead of at whichever grid point happens to sit below the level (which favours a
    variant that lands just under it). Outcomes ("status"): "interpolated"; "never reached" (every
    point forgets less than the level: no utility is given); "always below" (every point forgets
    more: the utility of the point nearest the level, from below, is given and flagged). With
    `erased`, each point's forget EM is max(forget EM, forget EM under replay) (`matched`'s rule)."""
    level = data["guess_level"] + margin
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key, points in curves(data).items():
        pts = [{**p, "forget_em": _forget_level(p, erased)} for p in sorted(points, key=lambda p: p["lr"])]
        res: dict[str, Any] = {"level": level}
        for a, b in zip(pts, pts[1:], strict=False):
            fa, fb = a["forget_em"], b["forget_em"]
            if (fa - level) * (fb - level) <= 0 and fa != fb:
                t = (fa - level) / (fa - fb)
                res.update(status="interpolated", utility_em=a["utility_em"] + t * (b["utility_em"] - a["utility_em"]),
                           neighbor_em=a["neighbor_em"] + t * (b["neighbor_em"] - a["neighbor_em"]),
                           between=[a["lr"], b["lr"]])
                break
        else:
            on = [p for p in pts if abs(p["forget_em"] - level) <= 1e-12]
            if on:
                res.update(status="interpolated", utility_em=on[0]["utility_em"], neighbor_em=on[0]["neighbor_em"],
                           between=[on[0]["lr"], on[0]["lr"]])
            elif all(p["forget_em"] > level for p in pts):
                res.update(status="never reached", min_forget_em=min(p["forget_em"] for p in pts))
            else:
                near = max(pts, key=lambda p: p["forget_em"])
                res.update(status="always below", utility_em=near["utility_em"], neighbor_em=near["neighbor_em"],
                           forget_em=near["forget_em"], between=[near["lr"], near["lr"]])
        out[key] = res
    return out


def realization_summary(results: Sequence[dict[str, Any]], margin: float = MATCH_MARGIN, *,
                        erased: bool = False) -> dict[str, Any]:
    """Matched-forgetting utility (`interpolated`) across frontier results of several realizations of a
    bench recipe (each read at its own guess level + margin): per (method, variant, steps) the value of
    each realization, their median and [min, max], and how many realizations never reached the level;
    and per (method, steps) the per-realization gap of each variant to "full" with its median. `erased`:
    read at max(forget EM, forget EM under replay) (see `interpolated`)."""
    if not results:
        raise BadInputError("give at least one frontier result")
    per: dict[tuple[str, str, int], list[float | None]] = {}
    names = []
    for i, data in enumerate(results):
        names.append(f"{data.get('model')}#r{data.get('realization', i)}")
        for key, r in interpolated(data, margin, erased=erased).items():
            per.setdefault(key, [None] * len(results))[i] = r.get("utility_em") if r["status"] != "never reached" \
                else None
    rows = []
    for (m, v, n), vals in sorted(per.items()):
        got = [x for x in vals if x is not None]
        gaps = None
        full = per.get((m, "full", n))
        if full is not None and v != "full":
            gaps = [None if a is None or b is None else a - b for a, b in zip(vals, full, strict=True)]
        g = [x for x in (gaps or []) if x is not None]
        rows.append({"method": m, "variant": v, "steps": n, "per_realization": vals,
                     "median": _median(got) if got else None, "range": [min(got), max(got)] if got else None,
                     "not_reached": len(vals) - len(got), "gap_to_full": gaps,
                     "gap_median": _median(g) if g else None, "gap_range": [min(g), max(g)] if g else None})
    return {"realizations": names, "margin": margin, "erased": erased, "rows": rows}


def summarize_realizations(results: Sequence[dict[str, Any]], margin: float = MATCH_MARGIN, *,
                           erased: bool = False) -> str:
    """The markdown of `realization_summary`."""
    s = realization_summary(results, margin, erased=erased)
    lines = [f"# Matched forgetting over {len(s['realizations'])} realizations", "",
             f"Realizations: {', '.join(s['realizations'])}. Utility EM interpolated along each variant's frontier at "
             f"{'max(forget EM, forget EM under replay)' if erased else 'forget EM'} = guess level + {margin} "
             "(each realization at its own guess level); median and [min, max] "
             "over realizations; gap = variant minus full, per realization.", "",
             "| method | variant | steps | utility EM median [range] | gap to full median [range] | not reached |",
             "|---|---|---:|---:|---:|---:|"]
    for r in s["rows"]:
        u = "-" if r["median"] is None else f"{r['median']:.3f} [{r['range'][0]:.3f}, {r['range'][1]:.3f}]"
        g = "-" if r["gap_median"] is None else \
            f"{r['gap_median']:+.3f} [{r['gap_range'][0]:+.3f}, {r['gap_range'][1]:+.3f}]"
        lines.append(f"| {r['method']} | {r['variant']} | {r['steps']} | {u} | {g} | {r['not_reached']} |")
    return "\n".join(lines) + "\n"


def summarize(data: dict[str, Any]) -> str:
    """The markdown summary: matched-forgetting utility per method and variant, per step count."""
    level = data["guess_level"]
    orig = data["original"]
    spec = data.get("specialisation", {})
    lines = [f"# Frontier: bench model `{data['model']}`", "",
             f"Device: {data['device']}. Original model: forget EM {orig['forget_em']:.3f}, utility EM "
             f"{orig['utility_em']:.3f}, neighbor EM {orig['neighbor_em']:.3f}; guess level (holdout EM) "
             f"{level:.3f}.", ""]
    if spec:
        lines += [f"SEUF target: layer {spec['target'][0]} expert {spec['target'][1]}, coverage {spec['coverage']:.2f} "
                  f"of forget tokens, selectivity {spec['selectivity']} (forget / retain selection frequency); "
                  f"UOE premise {'holds' if spec['premise_holds'] else 'does NOT hold'} (coverage >= 0.5 and "
                  "selectivity >= 2).", "",
                  "| layer | top expert | affinity | coverage | selectivity |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['layer']} | {p['expert']} | {p['affinity']:.3f} | {p['coverage']:.3f} | {p['selectivity']} |"
                  for p in spec["per_layer"]]
        lines.append("")
    lines += [f"Matched forgetting: per method and variant, the learning rate with the best median utility EM "
              f"among those whose median forget EM <= {level:.3f} + {MATCH_MARGIN} = {level + MATCH_MARGIN:.3f} "
              "(medians over seeds; [min, max] over seeds). `-` = no learning rate of the grid forgets that much.",
              ""]
    best = matched(data)
    div = [r for r in data["runs"] if r.get("diverged")]
    if div:
        lines += [f"{len(div)} runs diverged (NaN/inf loss; not in the medians): "
                  + ", ".join(sorted({f"{r['method']}/{r['variant']}@{r['lr']:g}" for r in div})), ""]
    for n in sorted({k[2] for k in best}):
        lines += [f"## {n} steps", "", "| method | variant | lr | forget EM | utility EM [seed range] | neighbor EM | "
                  "retain overlap | seeds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for (m, v, steps), p in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            if steps != n:
                continue
            if p is None:
                lines.append(f"| {m} | {v} | - | - | - | - | - | - |")
                continue
            lo, hi = p["utility_em_range"]
            lines.append(f"| {m} | {v} | {p['lr']:g} | {p['forget_em']:.3f} | {p['utility_em']:.3f} [{lo:.3f}, "
                         f"{hi:.3f}] | {p['neighbor_em']:.3f} | {p['overlap_retain']:.3f} | {p['seeds']} |")
        lines.append("")
    interp = interpolated(data)
    lines += [f"## Matched forgetting by interpolation (forget EM = {level + MATCH_MARGIN:.3f})", "",
              "Utility EM interpolated linearly in forget EM between the two learning rates whose median forget EM "
              "brackets the level (first crossing in increasing lr); `never reached` = no learning rate forgets that "
              "much; `always below` = every learning rate forgets more (the nearest point's utility, flagged).", "",
              "| method | variant | steps | utility EM | neighbor EM | between lrs | status |",
              "|---|---|---:|---:|---:|---|---|"]
    for (m, v, n), r in sorted(interp.items()):
        u = "-" if "utility_em" not in r else f"{r['utility_em']:.3f}"
        nb = "-" if "neighbor_em" not in r else f"{r['neighbor_em']:.3f}"
        lrs = "-" if "between" not in r else f"{r['between'][0]:g}-{r['between'][1]:g}"
        lines.append(f"| {m} | {v} | {n} | {u} | {nb} | {lrs} | {r['status']} |")
    lines.append("")
    return "\n".join(lines)


def plot_frontier(data: dict[str, Any], path: Path) -> None:
    """Median forget EM vs median utility EM, one curve per variant over learning rates, one panel per
    (method, steps); seed ranges as error bars; the guess level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_unlearn.atomic import atomic_path

    cs = curves(data)
    methods = sorted({k[0] for k in cs})
    steps = sorted({k[2] for k in cs})
    variants = sorted({k[1] for k in cs})
    fig, axes = plt.subplots(len(steps), len(methods), figsize=(4 * len(methods), 3.6 * len(steps)), dpi=100,
                             squeeze=False)
    try:
        for i, n in enumerate(steps):
            for j, m in enumerate(methods):
                ax = axes[i][j]
                for k, v in enumerate(variants):
                    pts = sorted(cs.get((m, v, n), []), key=lambda p: p["lr"])
                    if not pts:
                        continue
                    x = [p["forget_em"] for p in pts]
                    y = [p["utility_em"] for p in pts]
                    xerr = [[p["forget_em"] - p["forget_em_range"][0] for p in pts],
                            [p["forget_em_range"][1] - p["forget_em"] for p in pts]]
                    yerr = [[p["utility_em"] - p["utility_em_range"][0] for p in pts],
                            [p["utility_em_range"][1] - p["utility_em"] for p in pts]]
                    ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", ms=3, capsize=2, color=f"C{k}", label=v)
                ax.axvline(data["guess_level"] + MATCH_MARGIN, ls="--", color="grey", lw=1)
                ax.scatter([data["original"]["forget_em"]], [data["original"]["utility_em"]], marker="*", color="k",
                           s=60, zorder=5)
                ax.set_xlim(-0.03, 1.03)
                ax.set_ylim(-0.03, 1.03)
                ax.set_title(f"{m}, {n} steps", fontsize=9)
                ax.set_xlabel("forget EM (median)")
                ax.set_ylabel("utility EM (median)")
                ax.grid(alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{data['model']}: forgetting vs utility over learning rates (dashed: guess level + "
                     f"{MATCH_MARGIN}; star: original)", fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def device_name() -> str:
    """The device results were measured on (GPU name, or the CPU and its core count)."""
    import os
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


__all__ = ["EXPERT_LRS", "FULL_LRS", "MATCH_MARGIN", "VARIANTS", "FrontierConfig", "FrontierResult", "Variant",
           "curves", "default_lrs", "device_name", "merge_results", "matched", "plot_frontier", "register_variant", "results_path", "run_frontier",
           "specialisation", "summarize"]
