"""MUSE's sustainability and scalability evaluations.

- sustainability (`evaluate_sequential`): k unlearning requests arrive one after another; each is
  applied on top of the previous ones, and after each the model is evaluated on every request's
  forget set (already unlearned or still to come) and on the utility splits.
- scalability (`evaluate_scalability`): forget sets of growing size, each unlearned from the
  original model, each evaluated the same way.

How a request is applied is a *mode*: `MODES[name]()` gives, for one run, a function (model,
tokenizer, request, retain, out_dir, unlearn kwargs) -> an undo callable.
- "stacked": `moe_unlearn.unlearning.unlearn` in place, one reversible patch per request stacked
  on the previous ones (undone in reverse order); with unlearn kwargs adapter="lora" the stacked
  patches are low-rank adapters.
- "fused": each request's adapter is trained from the base model (the fused patch of the earlier
  requests is reverted first, then re-fused): after request k the model holds
  `fuse_patches([adapter_1 .. adapter_k])` (EUL's fusion; unlearn kwargs must name an adapter).
Row 0 of every result is the model before any request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moe_unlearn.atomic import staged_files, write_text
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.items import ItemsLike, as_items

SUMMARY_KEYS = ("nll", "token_accuracy", "exact_match", "rouge_l", "verbmem")


@dataclass
class UnlearnRequest:
    """One unlearning request: its name, forget records (for the forget metrics, and for unlearning
    unless `train` gives what the unlearning loss should see instead, e.g. the bench's
    `unlearning_records`), and optionally never-trained texts of the same kind (holdout, for MIA)."""

    name: str
    forget: ItemsLike
    holdout: ItemsLike | None = None
    train: Any = None


Mode = Callable[[nn.Module, Any, UnlearnRequest, Any, Path, dict[str, Any]], Callable[[], None]]


def _stacked(model: nn.Module, tokenizer, request: UnlearnRequest, retain, out_dir: Path,
             unlearn_kwargs: dict[str, Any]) -> Callable[[], None]:
    from moe_unlearn.unlearning import revert_patch, unlearn

    data = request.train if request.train is not None else _records(request.forget)
    res = unlearn(model, data, None if retain is None else _records(retain),
                  tokenizer=tokenizer, out_dir=out_dir, **unlearn_kwargs)
    return lambda: revert_patch(model, res.patch_path)


class _Fused:
    """The "fused" mode's state over one run: the adapters so far and the fused patch applied now."""

    def __init__(self) -> None:
        self.adapters: list[Path] = []
        self.applied: Path | None = None

    def _revert(self, model: nn.Module) -> None:
        from moe_unlearn.unlearning import revert_patch

        if self.applied is not None:
            revert_patch(model, self.applied)
            self.applied = None

    def __call__(self, model: nn.Module, tokenizer, request: UnlearnRequest, retain, out_dir: Path,
                 unlearn_kwargs: dict[str, Any]) -> Callable[[], None]:
        from moe_unlearn.unlearning import apply_patch, revert_patch, unlearn
        from moe_unlearn.unlearning.fusion import fuse_patches

        if not unlearn_kwargs.get("adapter"):
            raise BadInputError("mode 'fused' fuses adapters: give unlearn_kwargs adapter='lora'")
        self._revert(model)  # train from the base model
        data = request.train if request.train is not None else _records(request.forget)
        res = unlearn(model, data, None if retain is None else _records(retain), tokenizer=tokenizer,
                      out_dir=out_dir / "adapter", **unlearn_kwargs)
        revert_patch(model, res.patch_path)
        self.adapters.append(res.patch_path)
        fused = res.patch_path if len(self.adapters) == 1 else fuse_patches(model, self.adapters, out_dir / "fused")
        apply_patch(model, fused)
        self.applied = fused

        def undo() -> None:
            if self.applied == fused:
                self._revert(model)
        return undo


MODES: dict[str, Callable[[], Mode]] = {"stacked": lambda: _stacked, "fused": _Fused}


def _records(data: ItemsLike) -> Any:
    """What `unlearn` reads: paths and lists of strings / dicts as they are, EvalItem as texts / QA dicts."""
    from moe_unlearn.eval.items import EvalItem

    if isinstance(data, (str, os.PathLike)) or not any(isinstance(d, EvalItem) for d in data):
        return data
    out = []
    for it in as_items(data):
        out.append({"text": it.text} if it.text is not None else {"question": it.question, "answer": it.answer})
    return out


@dataclass
class StepResult:
    """One row: after `step` requests (0 = before any). metrics: {"<split>.<metric>": value, "mia.*"}."""

    step: int
    request: str | None
    n_forget: int
    metrics: dict[str, float]
    unlearn_seconds: float = 0.0
    eval_seconds: float = 0.0


@dataclass
class SequentialResult:
    kind: str  # "sustainability" or "scalability"
    mode: str
    steps: list[StepResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        keys = sorted({k for s in self.steps for k in s.metrics if k.split(".")[-1] in ("exact_match", "rouge_l")
                       or k.startswith("mia.privleak")})
        head = ["step", "request", "n forget"] + keys
        out = [f"## {self.kind} ({self.mode})", "", "| " + " | ".join(head) + " |",
               "|" + "---|" * len(head)]
        for s in self.steps:
            vals = [f"{s.metrics[k]:.3f}" if k in s.metrics else "-" for k in keys]
            out.append("| " + " | ".join([str(s.step), s.request or "-", str(s.n_forget)] + vals) + " |")
        return "\n".join(out) + "\n"

    def write_all(self, out_dir: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
        """<name>.json and <name>.md in out_dir (all or nothing); name defaults to the kind."""
        import json

        name = name or self.kind
        out = Path(out_dir)
        with staged_files(out) as tmp:
            write_text(tmp / f"{name}.json", json.dumps(self.to_dict(), indent=2) + "\n")
            write_text(tmp / f"{name}.md", self.to_markdown())
        return {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}


Extra = Callable[[nn.Module], Mapping[str, float]] | None


def _metrics(model, tokenizer, forget_splits: Mapping[str, ItemsLike], utility: Mapping[str, ItemsLike],
             holdout: ItemsLike | None, eval_kwargs: dict[str, Any], mia_split: str | None,
             extra: Extra = None) -> dict[str, float]:
    from moe_unlearn.eval.suite import evaluate

    flat: dict[str, float] = dict(extra(model)) if extra is not None else {}
    splits = {f"forget_{k}": v for k, v in forget_splits.items()} | dict(utility)
    quality_kwargs = {k: v for k, v in eval_kwargs.items() if k not in ("reference_auc", "reference_model")}
    rep = evaluate(model, tokenizer, extra_splits=splits, progress=False, **quality_kwargs)
    for key, value in rep.summary().items():
        if key.split(".")[-1] in SUMMARY_KEYS:
            flat[key] = value
    if holdout is not None and mia_split is not None:
        mia = evaluate(model, tokenizer, forget=forget_splits[mia_split], holdout=holdout, generate=False,
                       progress=False, **{k: v for k, v in eval_kwargs.items() if k not in ("generate",)}).mia
        for a, v in mia.auc.items():
            flat[f"mia.auc.{a}"] = v
        for a, v in (mia.privleak or {}).items():
            flat[f"mia.privleak.{a}"] = v
    return flat


def _check(mode: str, work_dir) -> Mode:
    if mode not in MODES:
        raise BadInputError(f"unknown mode {mode!r}; registered: {sorted(MODES)}")
    if work_dir is None:
        raise BadInputError("work_dir is needed: each request writes its patch there")
    return MODES[mode]()


def evaluate_sequential(model: nn.Module, tokenizer, requests: Sequence[UnlearnRequest], *, retain: ItemsLike,
                        utility: Mapping[str, ItemsLike] | None = None, mode: str = "stacked",
                        unlearn_kwargs: Mapping[str, Any] | None = None,
                        eval_kwargs: Mapping[str, Any] | None = None, work_dir: str | os.PathLike | None = None,
                        restore: bool = True, extra_metrics: Extra = None) -> SequentialResult:
    """Sustainability: apply `requests` one after another (mode), evaluate after each (module docstring).
    retain: what unlearning preserves and a utility split; utility: further {name: data} splits.
    eval_kwargs go to `evaluate` (e.g. reference_auc, convention, generate); extra_metrics(model) ->
    {name: value} adds numbers to every row (TOFU's forget quality, say). The model is restored
    (every request undone in reverse order) unless restore=False."""
    apply = _check(mode, work_dir)
    if not requests:
        raise BadInputError("evaluate_sequential needs at least one request")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise BadInputError(f"request names must be unique, got {names}")
    forget = {r.name: as_items(r.forget, f"request {r.name}") for r in requests}  # validate everything first
    util = {"retain": as_items(retain, "retain")} | {k: as_items(v, k) for k, v in (utility or {}).items()}
    holdouts = {r.name: as_items(r.holdout, f"{r.name} holdout") for r in requests if r.holdout is not None}
    ukw, ekw = dict(unlearn_kwargs or {}), dict(eval_kwargs or {})
    work = Path(work_dir)
    t0 = time.perf_counter()
    first = requests[0].name
    steps = [StepResult(0, None, 0, _metrics(model, tokenizer, forget, util, holdouts.get(first), ekw, first,
                                             extra_metrics),
                        eval_seconds=time.perf_counter() - t0)]
    undo: list[Callable[[], None]] = []
    try:
        for k, req in enumerate(requests, start=1):
            t0 = time.perf_counter()
            undo.append(apply(model, tokenizer, req, retain, work / f"step{k}_{req.name}", ukw))
            t1 = time.perf_counter()
            metrics = _metrics(model, tokenizer, forget, util, holdouts.get(req.name), ekw, req.name, extra_metrics)
            steps.append(StepResult(k, req.name, sum(len(forget[r.name]) for r in requests[:k]), metrics,
                                    unlearn_seconds=t1 - t0, eval_seconds=time.perf_counter() - t1))
    finally:
        if restore:
            for u in reversed(undo):
                u()
    return SequentialResult("sustainability", mode, steps, {"unlearn": _jsonable(ukw), "eval": _jsonable(ekw),
                                                            "requests": names})


def evaluate_scalability(model: nn.Module, tokenizer, forget: ItemsLike, sizes: Sequence[int], *,
                         retain: ItemsLike, utility: Mapping[str, ItemsLike] | None = None,
                         holdout: ItemsLike | None = None, mode: str = "stacked",
                         unlearn_kwargs: Mapping[str, Any] | None = None,
                         eval_kwargs: Mapping[str, Any] | None = None,
                         work_dir: str | os.PathLike | None = None, train: Callable[[int], Any] | None = None,
                         extra_metrics: Extra = None) -> SequentialResult:
    """Scalability: for each n in `sizes`, unlearn the first n forget records from the original model,
    evaluate the forget subset and the utility splits, undo. The model is the original afterwards.
    train(n): what the unlearning loss sees for size n (default: the first n records themselves)."""
    apply = _check(mode, work_dir)
    items = as_items(forget, "forget")
    if not sizes or any(not 1 <= n <= len(items) for n in sizes):
        raise BadInputError(f"sizes must be in 1..{len(items)} (the forget set), got {list(sizes)}")
    util = {"retain": as_items(retain, "retain")} | {k: as_items(v, k) for k, v in (utility or {}).items()}
    hold = as_items(holdout, "holdout") if holdout is not None else None
    ukw, ekw = dict(unlearn_kwargs or {}), dict(eval_kwargs or {})
    t0 = time.perf_counter()
    steps = [StepResult(0, None, 0, _metrics(model, tokenizer, {"all": items}, util, hold, ekw, "all", extra_metrics),
                        eval_seconds=time.perf_counter() - t0)]
    for k, n in enumerate(sizes, start=1):
        sub = items[:n]
        t0 = time.perf_counter()
        req = UnlearnRequest(f"n{n}", sub, train=train(n) if train is not None else None)
        undo = apply(model, tokenizer, req, retain, Path(work_dir) / f"size{n}", ukw)
        try:
            t1 = time.perf_counter()
            metrics = _metrics(model, tokenizer, {"subset": sub, "all": items}, util, hold, ekw, "subset",
                               extra_metrics)
            steps.append(StepResult(k, f"first {n}", n, metrics, unlearn_seconds=t1 - t0,
                                    eval_seconds=time.perf_counter() - t1))
        finally:
            undo()
    return SequentialResult("scalability", mode, steps, {"unlearn": _jsonable(ukw), "eval": _jsonable(ekw),
                                                         "sizes": list(sizes)})


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v) for k, v in d.items()}
