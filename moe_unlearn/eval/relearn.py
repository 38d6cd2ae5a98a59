"""Relearning probe: does a little fine-tuning on some forget facts bring the others back?

Knowledge that was hidden (by the router, or by a thin layer of suppression) comes back after
a few steps of fine-tuning on a small part of the forget set, also on the facts that were not
fine-tuned on; knowledge that was erased comes back no faster than in a model that never saw
it. The probe fine-tunes a copy of each model (every parameter, AdamW through the one training
loop, constant learning rate, answer-only loss) on a fraction of the forget facts and scores the
exact match on the other ("held") forget facts every few steps, for the unlearned model, the
retrained reference (never trained on the forget facts: the floor) and the original.

Summary: steps to reach half the original's held EM at step 0; the unlearned model's count
relative to the reference's. A reference that does not get there within the budget is censored
at the budget (reported as such, not as a number it never reached). Beside it: the area under
each relearning curve (mean held EM over the attack, trapezoids over the evaluated steps, in
[0, 1]), the highest held EM reached, and both above the retrained reference's (the floor).

Calibration (`calibrate_relearn`, `calibrated_relearn_probe`): an attack strong enough to damage
knowledge by itself measures its own damage, not relearning (at lr 1e-3 on every parameter the
bench models' *original* held EM falls from 1.00 to about 0.55 in 40 steps). The calibrated attack
keeps every other setting and lowers the learning rate: it tries a grid from high to low and takes
the highest lr at which the original model's held EM stays >= `keep` (0.9) times its held EM before
fine-tuning, at every evaluated step of the same fine-tuning (on a model that knows all its held
facts: >= 0.9). The old defaults (`RelearnConfig()`, lr 1e-3) stay what `relearn_probe`
runs unless it is given the calibrated config.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError
from moe_unlearn.training import TrainConfig, TrainHooks, train
from moe_unlearn.validate import MAX_ITEMS, MAX_STEPS, MAX_TOKENS, bounded


@dataclass
class RelearnConfig:
    """fraction: share of the forget facts fine-tuned on (the rest are held out and scored);
    steps / lr / batch_size: the fixed fine-tuning budget; eval_every: steps between scorings."""

    fraction: float = 0.15
    steps: int = bounded(40, low=1, high=MAX_STEPS)
    eval_every: int = bounded(5, low=1, high=MAX_STEPS)
    lr: float = 1e-3
    batch_size: int = bounded(8, low=1, high=MAX_ITEMS)
    max_length: int = bounded(64, low=2, high=MAX_TOKENS)
    seed: int = bounded(0, low=0)
    eval_batch_size: int = bounded(64, low=1, high=MAX_ITEMS)

    def validate(self) -> None:
        from moe_unlearn.validate import check_fields, check_int

        check_fields(self, prefix="relearn ")
        check_int("relearn seed", self.seed, low=0)
        if not 0.0 < self.fraction < 1.0:
            raise BadInputError(f"relearn fraction must be in (0, 1), got {self.fraction}")
        for name in ("steps", "eval_every", "batch_size", "max_length", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise BadInputError(f"relearn {name} must be a positive integer, got {v!r}")
        if not 0.0 < self.lr < 1.0:
            raise BadInputError(f"relearn lr must be in (0, 1), got {self.lr}")

    def eval_steps(self) -> list[int]:
        return sorted({0, *range(self.eval_every, self.steps + 1, self.eval_every), self.steps})


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fine-tuned, held) indices of n facts: round(fraction * n) (at least 1, at most n - 1) drawn
    with the seed; both lists sorted."""
    if n < 2:
        raise BadInputError(f"the relearning probe needs at least 2 forget facts, got {n}")
    k = min(n - 1, max(1, round(fraction * n)))
    chosen = sorted(random.Random(seed).sample(range(n), k))
    picked = set(chosen)
    return chosen, [i for i in range(n) if i not in picked]


@dataclass
class RelearnCurve:
    """Held-fact exact match / NLL after each evaluated fine-tuning step (step 0 = before)."""

    steps: list[int] = field(default_factory=list)
    em: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)

    def auc(self) -> float:
        """Area under the held-EM curve over the attack, divided by its length: the mean held EM (trapezoids
        between evaluated steps; a single point is its own value)."""
        if len(self.steps) < 2 or self.steps[-1] == self.steps[0]:
            return float(self.em[0]) if self.em else 0.0
        area = sum((b - a) * (ea + eb) / 2 for a, b, ea, eb in zip(self.steps, self.steps[1:], self.em, self.em[1:],
                                                                        strict=False))
        return round(area / (self.steps[-1] - self.steps[0]), 4)

    def max_em(self) -> float:
        """The highest held EM over the attack (step 0 included)."""
        return max(self.em) if self.em else 0.0

    def steps_to(self, level: float) -> int | None:
        """First evaluated step with EM >= level (None: not within the budget)."""
        return next((s for s, e in zip(self.steps, self.em, strict=True) if e >= level - 1e-12), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ScoreAt(TrainHooks):
    def __init__(self, steps: Sequence[int], score) -> None:
        self.steps, self.score = set(steps), score
        self.curve = RelearnCurve()

    def add(self, step: int) -> None:
        em, nll = self.score()
        self.curve.steps.append(step)
        self.curve.em.append(round(em, 4))
        self.curve.nll.append(round(nll, 4))

    def after_step(self, step: int) -> None:
        if step in self.steps:
            self.add(step)


def relearn_curve(model: nn.Module, tokenizer: Any, train_data: Any, held: Any, config: RelearnConfig) -> RelearnCurve:
    """Fine-tune a deep copy of `model` (the model itself is untouched) on `train_data` (anything
    `moe_unlearn.data.load_examples` reads; QA records are scored on their answers) and score
    exact match on `held` (QA records) at `config.eval_steps()`."""
    from moe_unlearn.data import load_examples, tokenize_batches
    from moe_unlearn.eval.items import as_items
    from moe_unlearn.eval.metrics import split_metrics
    from moe_unlearn.eval.scoring import PromptFormat, encode_items, model_device, score_encoded

    config.validate()
    items = as_items(held, "held")
    if not all(it.is_qa for it in items):
        raise BadInputError("relearning probe: the held facts must be QA records {question, answer}")
    encoded = encode_items(tokenizer, items, PromptFormat(max_length=config.max_length))
    batches = tokenize_batches(load_examples(train_data), tokenizer, batch_size=config.batch_size,
                               max_length=config.max_length, padding_side="right",
                               loss_tokens="answer").shuffled(config.seed)
    work = copy.deepcopy(model)
    work.eval()  # no dropout: the same seed gives the same curve
    params = list(work.parameters())
    for p in params:
        p.requires_grad_(True)
    device = model_device(work)

    def score() -> tuple[float, float]:
        m = split_metrics(score_encoded(work, tokenizer, encoded, batch_size=config.eval_batch_size).items,
                          [True] * len(encoded))
        return float(m.exact_match), float(m.nll)

    def loss_fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(device) for k, v in batch.items()}
        return {"loss": work(**batch).loss}

    hook = _ScoreAt(config.eval_steps(), score)
    hook.add(0)
    train(params, loss_fn, batches, TrainConfig(steps=config.steps, lr=config.lr, seed=config.seed, bf16=False,
                                                progress=False, desc="relearn"), hooks=[hook])
    return hook.curve


@dataclass
class RelearnResult:
    """Curves per model name, the level (half the original's step-0 held EM) and steps to reach it."""

    curves: dict[str, RelearnCurve]
    level: float
    steps_to_half: dict[str, int | None]
    budget: int
    n_train: int
    n_held: int

    def relative_to(self, name: str, reference: str = "reference") -> float | None:
        """steps_to_half[name] / steps_to_half[reference]. A reference that never got there counts as
        budget + 1 steps, so the ratio is then an upper bound of the true one (see
        `reference_censored` in to_dict). None when `name` did not get there within the budget."""
        a, b = self.steps_to_half.get(name), self.steps_to_half.get(reference)
        if a is None:
            return None
        b_eff = b if b is not None else self.budget + 1
        return round(a / max(b_eff, 1), 4)

    def to_dict(self, reference: str = "reference") -> dict[str, Any]:
        auc = {k: c.auc() for k, c in self.curves.items()}
        top = {k: c.max_em() for k, c in self.curves.items()}
        floor = {"auc_above_reference": {k: round(v - auc[reference], 4) for k, v in auc.items() if k != reference},
                 "max_em_above_reference": {k: round(v - top[reference], 4) for k, v in top.items() if k != reference}
                 } if reference in self.curves else {}
        return {"level": self.level, "budget": self.budget, "n_train": self.n_train, "n_held": self.n_held,
                "steps_to_half": self.steps_to_half, "auc": auc, "max_em": top, **floor,
                "reference_censored": self.steps_to_half.get(reference) is None,
                "relative_to_reference": {k: self.relative_to(k, reference) for k in self.curves if k != reference},
                "curves": {k: c.to_dict() for k, c in self.curves.items()}}


def relearn_probe(models: Mapping[str, nn.Module], tokenizer: Any, train_data: Any, held: Any,
                  config: RelearnConfig | None = None, *, original: str = "original",
                  level: float | None = None) -> RelearnResult:
    """One curve per model; level = half of models[original]'s held EM before fine-tuning (or `level`)."""
    config = config or RelearnConfig()
    curves = {name: relearn_curve(m, tokenizer, train_data, held, config) for name, m in models.items()}
    if level is None:
        if original not in curves:
            raise BadInputError(f"relearn_probe needs the original model under {original!r} (or level=...)")
        level = 0.5 * curves[original].em[0]
    n_held = len(held) if hasattr(held, "__len__") else -1
    n_train = len(train_data) if hasattr(train_data, "__len__") else -1
    return RelearnResult(curves=curves, level=round(level, 4),
                         steps_to_half={k: c.steps_to(level) for k, c in curves.items()},
                         budget=config.steps, n_train=n_train, n_held=n_held)


DEFAULT_CALIBRATION_LRS = (1e-3, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5)


@dataclass
class Calibration:
    """The calibrated attack: `config` (the base config at the chosen lr), the original's curve under it,
    and every lr tried with the original's lowest held EM over that attack."""

    config: RelearnConfig
    keep: float
    original_curve: RelearnCurve
    tried: dict[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"rule": f"highest lr of the grid at which the original's held EM stays >= {self.keep} x its EM "
                        "before fine-tuning at every evaluated step (all parameters, same data and steps)",
                "lr": self.config.lr, "keep": self.keep, "original_min_em_by_lr": {str(k): v for k, v in
                                                                                   self.tried.items()},
                "config": asdict(self.config), "original_curve": self.original_curve.to_dict()}


def calibrate_relearn(original: nn.Module, tokenizer: Any, train_data: Any, held: Any,
                      base: RelearnConfig | None = None, *, lrs: Sequence[float] = DEFAULT_CALIBRATION_LRS,
                      keep: float = 0.9) -> Calibration:
    """The highest lr of `lrs` (tried from high to low; `base`'s other settings) under which `original`'s
    held EM stays >= `keep` x its held EM before fine-tuning at every evaluated step; BadInputError when
    none of them keeps it. `tried`: {lr: the lowest held EM over that attack}."""
    base = base or RelearnConfig()
    if not 0.0 < keep <= 1.0:
        raise BadInputError(f"relearn calibration keep must be in (0, 1], got {keep}")
    if not lrs:
        raise BadInputError("relearn calibration needs at least one learning rate")
    tried: dict[float, float] = {}
    for lr in sorted({float(x) for x in lrs}, reverse=True):
        cfg = RelearnConfig(**{**asdict(base), "lr": lr})
        curve = relearn_curve(original, tokenizer, train_data, held, cfg)
        tried[lr] = min(curve.em)
        if tried[lr] >= keep * curve.em[0] - 1e-12:
            return Calibration(cfg, keep, curve, tried)
    raise BadInputError(f"no learning rate of {sorted(tried, reverse=True)} keeps the original's held EM >= {keep} x "
                        f"its EM before fine-tuning (lowest held EM per lr: {tried}); try lower learning rates")


def calibrated_relearn_probe(models: Mapping[str, nn.Module], tokenizer: Any, train_data: Any, held: Any,
                             base: RelearnConfig | None = None, *, original: str = "original",
                             lrs: Sequence[float] = DEFAULT_CALIBRATION_LRS,
                             keep: float = 0.9) -> tuple[RelearnResult, Calibration]:
    """`relearn_probe` under the attack calibrated on models[original] (its curve is reused, not rerun);
    level = half the original's held EM before fine-tuning."""
    if original not in models:
        raise BadInputError(f"calibrated_relearn_probe needs the original model under {original!r}")
    cal = calibrate_relearn(models[original], tokenizer, train_data, held, base, lrs=lrs, keep=keep)
    curves = {name: cal.original_curve if name == original else
              relearn_curve(m, tokenizer, train_data, held, cal.config) for name, m in models.items()}
    level = 0.5 * curves[original].em[0]
    n_held = len(held) if hasattr(held, "__len__") else -1
    n_train = len(train_data) if hasattr(train_data, "__len__") else -1
    result = RelearnResult(curves=curves, level=round(level, 4),
                           steps_to_half={k: c.steps_to(level) for k, c in curves.items()},
                           budget=cal.config.steps, n_train=n_train, n_held=n_held)
    return result, cal


def plot_relearn(panels: Mapping[str, Mapping[str, RelearnCurve | Mapping[str, Any]]], path: Any,
                 level: float | None = None, title: str = "") -> None:
    """One panel per run: held-fact EM vs fine-tuning steps, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_unlearn.atomic import atomic_path

    names = list(panels)
    cols = min(4, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), dpi=100, squeeze=False)
    try:
        for i, name in enumerate(names):
            ax = axes[i // cols][i % cols]
            for k, (model_name, c) in enumerate(panels[name].items()):
                d = c.to_dict() if isinstance(c, RelearnCurve) else c
                ax.plot(d["steps"], d["em"], marker="o", ms=3, color=f"C{k}", label=model_name)
            if level is not None:
                ax.axhline(level, ls="--", color="grey", lw=1)
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("fine-tuning steps")
            ax.set_ylabel("held forget EM")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for j in range(len(names), rows * cols):
            axes[j // cols][j % cols].axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


__all__ = ["DEFAULT_CALIBRATION_LRS", "Calibration", "RelearnConfig", "RelearnCurve", "calibrate_relearn",
           "calibrated_relearn_probe", "RelearnResult", "plot_relearn", "relearn_curve", "relearn_probe",
           "split_indices"]
