"""The one training loop of the project (pretraining the demo model, LoRAMoE, unlearning).

    history = train(model.parameters(), loss_fn, batches, TrainConfig(steps=100, lr=1e-3))

- `loss_fn(batch) -> {"loss": scalar, "nll": ..., ...}`: "loss" is what is minimised; every
  other entry is a named term, shown in the progress bar and recorded in the history
  (tensors are detached and averaged over the micro-batches of a step).
- `batches`: a re-iterable (list, DataLoader, ...) or a callable `batches(epoch) -> iterable`
  (give the callable a `__len__` when every epoch has the same number of micro-batches).
  One element = one micro-batch. It must yield the same sequence for the same epoch (and
  seed) every time, so that a resumed run sees the same data as an uninterrupted one.
- One *step* = one optimizer update = `grad_accum` micro-batches (fewer at the end of an
  epoch: a step never spans two epochs; the gradient is then the mean over what there was).
  `steps` counts steps; with `epochs` instead, training runs that many passes over `batches`.
- The loop never changes `model.train()/eval()`: the caller decides (dropout etc.).

Training slices of tensors (e.g. one expert inside a fused `[E, ...]` parameter): give the
loop small leaf tensors that own the optimizer state plus `TrainHooks` that move gradients
into them and write them back after each step (see `moe_unlearn.unlearning.scopes.SliceParams`).

Another loop can stand in for this one: inside `with use_loop(fn):`, `train(...)` calls
`fn(params_or_groups, loss_fn, batches, config, hooks)` instead (moe_unlearn.integrations.hf_trainer
lets a Hugging Face Trainer drive `unlearn()` this way).
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moe_unlearn.atomic import atomic_path, clean_dead_temps
from moe_unlearn.errors import BadInputError, TrainingDiverged
from moe_unlearn.log import get_logger, open_sinks, parse_report_to
from moe_unlearn.validate import MAX_ITEMS, MAX_STEPS, bounded, check_number

LR_SCHEDULES = ("constant", "linear", "cosine")
logger = get_logger(__name__)
_CKPT_PATTERN = "step_*.pt"


@dataclass
class TrainConfig:
    """Knobs of `train`. Exactly one of `steps` / `epochs` must be set.

    lr_schedule: "constant" | "linear" (to 0 at the last step) | "cosine" (to 0), each after
    `warmup_steps` of linear warm-up from 0. bf16: "auto" autocasts to bf16 only on a CUDA
    device that supports it (never on the CPU); True forces it, False turns it off.
    checkpoint_every: steps between checkpoints (0 = none) into `checkpoint_dir`;
    resume=True continues from the latest checkpoint there (starts fresh if there is none).
    max_grad_norm: clip the global gradient norm (None or 0 = no clipping).
    """

    steps: int | None = bounded(None, low=1, high=MAX_STEPS)
    epochs: int | None = bounded(None, low=1, high=MAX_STEPS)
    batch_size: int = bounded(8, low=1, high=MAX_ITEMS)  # informational for callers that build batches from it
    grad_accum: int = bounded(1, low=1, high=MAX_STEPS)
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = bounded(0, low=0, high=MAX_STEPS)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = bounded(0, low=0)
    bf16: bool | str = "auto"
    checkpoint_every: int = bounded(0, low=0, high=MAX_STEPS)
    checkpoint_dir: str | None = None
    keep_checkpoints: int = bounded(1, low=1, high=MAX_STEPS)
    resume: bool = False
    progress: bool = True
    log_every: int = bounded(1, low=0, high=MAX_STEPS)
    desc: str = "train"
    # metrics sinks (moe_unlearn.log): "tensorboard", "jsonl" (a list or comma-separated), under logging_dir
    report_to: str | list[str] | None = None
    logging_dir: str | None = None
    # what the run is (method, targets, data hash, ...): stored in each checkpoint, and `resume` refuses a
    # checkpoint whose identity differs, so a resumed run can never finish another run's work
    run_identity: dict[str, Any] | None = None

    def validate(self) -> None:
        from moe_unlearn.validate import check_fields

        check_fields(self, prefix="TrainConfig.", skip=("checkpoint_dir", "run_identity"))
        if (self.steps is None) == (self.epochs is None):
            raise BadInputError("TrainConfig: set exactly one of steps or epochs")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BadInputError(f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if self.bf16 not in (True, False, "auto"):
            raise BadInputError(f"TrainConfig.bf16 must be True, False or 'auto', got {self.bf16!r}")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise BadInputError("checkpoint_every / resume need checkpoint_dir")
        check_number("TrainConfig.lr", self.lr, low=0.0, low_open=True)
        check_number("TrainConfig.weight_decay", self.weight_decay, low=0.0)
        check_number("TrainConfig.eps", self.eps, low=0.0, low_open=True)
        if self.max_grad_norm is not None:
            check_number("TrainConfig.max_grad_norm", self.max_grad_norm, low=0.0)
        if parse_report_to(self.report_to) and not self.logging_dir:
            raise BadInputError("TrainConfig: report_to needs logging_dir")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise BadInputError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        for b in self.betas:
            check_number("TrainConfig.betas", b, low=0.0, high=1.0, high_open=True)


@dataclass
class TrainHistory:
    """What happened: one entry per optimizer step (1-based step numbers)."""

    steps: list[int] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    wall_time: float = 0.0
    optimizer_state_bytes: int = 0  # after the last step (Adam moments etc.)
    resumed_from: int | None = None  # step of the checkpoint a resumed run started from

    def record(self, step: int, terms: Mapping[str, float], lr: float, grad_norm: float) -> None:
        self.steps.append(step)
        for k, v in terms.items():
            self.terms.setdefault(k, []).append(float(v))
        self.lr.append(float(lr))
        self.grad_norm.append(float(grad_norm))

    def final(self) -> dict[str, float]:
        """Loss terms of the last step."""
        return {k: v[-1] for k, v in self.terms.items() if v}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainHooks:
    """Callbacks of the loop; subclass and override what you need. All default to no-ops.

    after_backward(step): all micro-batches of `step` are back-propagated; runs before
        gradient clipping and the optimizer step (move gradients into leaf tensors here).
    after_step(step):  the optimizer has updated the leaves (write them back here).
    after_resume(step): the leaves were loaded from a checkpoint of `step`.
    on_log(step, terms): every `log_every` steps, with the step's averaged terms.
    on_train_start(optimizer): once, after the optimizer exists (and a checkpoint is loaded).
    reduce_terms(terms): the step's averaged terms before they are recorded and logged (data
        parallel averages them over the ranks here); returns the terms to record.
    """

    def on_train_start(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def after_resume(self, step: int) -> None:
        pass

    def on_log(self, step: int, terms: Mapping[str, float]) -> None:
        pass

    def reduce_terms(self, terms: Mapping[str, float]) -> Mapping[str, float]:
        return terms


class _HookList(TrainHooks):
    def __init__(self, hooks: Sequence[TrainHooks]) -> None:
        self.hooks = list(hooks)

    def on_train_start(self, optimizer: torch.optim.Optimizer) -> None:
        for h in self.hooks:
            h.on_train_start(optimizer)

    def after_backward(self, step: int) -> None:
        for h in self.hooks:
            h.after_backward(step)

    def after_step(self, step: int) -> None:
        for h in self.hooks:
            h.after_step(step)

    def after_resume(self, step: int) -> None:
        for h in self.hooks:
            h.after_resume(step)

    def on_log(self, step: int, terms: Mapping[str, float]) -> None:
        for h in self.hooks:
            h.on_log(step, terms)

    def reduce_terms(self, terms: Mapping[str, float]) -> Mapping[str, float]:
        for h in self.hooks:
            terms = h.reduce_terms(terms)
        return terms


# -- pieces ------------------------------------------------------------------------------------


_LOOP: contextvars.ContextVar[Callable[..., TrainHistory] | None] = contextvars.ContextVar("moe_unlearn_loop",
                                                                                         default=None)


@contextlib.contextmanager
def use_loop(loop: Callable[..., TrainHistory]) -> Iterator[None]:
    """Inside this block `train(params_or_groups, loss_fn, batches, config, hooks=...)` returns
    `loop(params_or_groups, loss_fn, batches, config, hooks)` (a TrainHistory) instead of running
    the built-in loop; the caller (e.g. `unlearn()`) is unchanged around it."""
    token = _LOOP.set(loop)
    try:
        yield
    finally:
        _LOOP.reset(token)


def hook_list(hooks: TrainHooks | Sequence[TrainHooks] | None) -> TrainHooks:
    """One TrainHooks object for a hook, a list of them or None."""
    return hooks if isinstance(hooks, TrainHooks) else _HookList(hooks or [])


def param_groups(params_or_groups: Iterable[Any]) -> list[dict[str, Any]]:
    """Torch-style param groups of `train`'s first argument, keeping only tensors that need a grad."""
    return _param_groups(params_or_groups)


def total_steps_of(config: TrainConfig, batches: Any) -> int | None:
    """Optimizer steps of a run: `steps`, or epochs x ceil(micro-batches per epoch / grad_accum)
    (None where the epoch length is unknown)."""
    if config.steps is not None:
        return config.steps
    epoch_len = _epoch_len(batches)
    return None if epoch_len is None else config.epochs * math.ceil(epoch_len / config.grad_accum)


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig,
                   total_steps: int | None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The AdamW and lr schedule `train` uses (one place, so another loop can use the same)."""
    for g in groups:
        g.setdefault("weight_decay", config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps or 1))
    return optimizer, scheduler


def epoch_iter(batches: Any, epoch: int) -> Iterator[Any]:
    """The micro-batches of one epoch of `train`'s `batches`."""
    return _epoch_iter(batches, epoch)


def epoch_len(batches: Any) -> int | None:
    """Micro-batches per epoch of `train`'s `batches`, where known."""
    return _epoch_len(batches)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype `train` autocasts the loss to on `device` (None: no autocast)."""
    return _autocast_dtype(config, device)


def _param_groups(params_or_groups: Iterable[Any]) -> list[dict[str, Any]]:
    items = list(params_or_groups)
    if not items:
        raise BadInputError("train() got no parameters to train")
    if isinstance(items[0], Mapping):
        groups = [dict(g) for g in items]
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
    else:
        groups = [{"params": [p for p in items if p.requires_grad]}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise BadInputError("train() got parameters, but none has requires_grad=True")
    return groups


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at (0-based) step index `i`."""

    def factor(i: int) -> float:
        if config.warmup_steps and i < config.warmup_steps:
            return (i + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (i - config.warmup_steps) / span)
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _epoch_iter(batches: Any, epoch: int) -> Iterator[Any]:
    if callable(batches):
        return iter(batches(epoch))
    return iter(batches)


def _epoch_len(batches: Any) -> int | None:
    """Micro-batches per epoch, where known (a callable may say so with __len__)."""
    if callable(batches) and not hasattr(batches, "__len__"):
        return None
    try:
        return len(batches)
    except TypeError:
        return None


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.bf16 is True:
        return torch.bfloat16
    if config.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _scalar(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


# -- checkpoints -------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_CKPT_NAME = re.compile(r"^step_(\d{1,18})\.pt$")


def _checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints `train` wrote in `checkpoint_dir`, by step; other files that match the
    glob (a stray step_final.pt, a copy) are not checkpoints of this run and are left alone."""
    found = []
    for p in glob.glob(os.path.join(os.fspath(checkpoint_dir), _CKPT_PATTERN)):
        m = _CKPT_NAME.match(os.path.basename(p))
        if m and os.path.isfile(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """Path of the checkpoint with the highest step in `checkpoint_dir`, or None."""
    found = _checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def _save_checkpoint(config: TrainConfig, state: dict[str, Any], step: int) -> None:
    """Atomic: write to a temp file in the same folder, then rename; then prune old ones."""
    d = os.fspath(config.checkpoint_dir)
    clean_dead_temps(d)  # half-written checkpoints of a run that was killed
    with atomic_path(os.path.join(d, f"step_{step:08d}.pt")) as tmp:
        torch.save(state, tmp)
    paths = [p for _, p in _checkpoints(d)]
    for old in paths[: max(0, len(paths) - max(1, config.keep_checkpoints))]:
        os.unlink(old)


_IDENTITY_KEYS = ("steps", "epochs", "grad_accum", "lr", "lr_schedule", "warmup_steps", "weight_decay", "betas",
                  "eps", "max_grad_norm", "seed", "bf16")


def run_identity(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the knobs that change the steps it holds (the number of
    steps only where the schedule depends on it), plus the caller's `run_identity` (JSON-normalised, so that
    tuples and lists compare equal)."""
    import json

    keys = [k for k in _IDENTITY_KEYS  # a constant schedule may be extended: more steps, same first ones
            if config.lr_schedule != "constant" or k not in ("steps", "epochs")]
    ident = {"train": {k: getattr(config, k) for k in keys}, "run": config.run_identity or {}}
    return json.loads(json.dumps(ident, sort_keys=True, default=str))


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def load_checkpoint(path: str | os.PathLike, leaves: Sequence[torch.Tensor],
                    identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint written by `train` safely (`weights_only=True`: tensors and plain containers, never
    pickled code) and check that it belongs to this run; BadInputError otherwise."""
    where = f"remove {os.path.dirname(os.fspath(path)) or '.'} or train without resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle with code in it, garbage: all the same to us
        raise BadInputError(f"checkpoint {path} cannot be read safely ({_first_line(exc)}); {where}") from None
    need = ("params", "optimizer", "scheduler", "rng", "step", "epoch", "consumed", "history")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise BadInputError(f"checkpoint {path} is not a moe-unlearn training checkpoint; {where}")
    params = state["params"]
    if (not isinstance(params, list) or len(params) != len(leaves)
            or any(not isinstance(a, torch.Tensor) or tuple(a.shape) != tuple(b.shape)
                   for a, b in zip(params, leaves, strict=False))):
        raise BadInputError(f"checkpoint {path} does not match the parameters being trained; {where}")
    if identity is not None and state.get("identity") != identity:
        theirs = state.get("identity") or {}
        diff = sorted({*_diff_keys(theirs.get("train", {}), identity.get("train", {})),
                       *_diff_keys(theirs.get("run", {}), identity.get("run", {}))})
        raise BadInputError(f"checkpoint {path} belongs to a different run (differs in: "
                            f"{', '.join(diff) or 'format'}); {where}")
    if any(not bool(torch.isfinite(p).all()) for p in params if p.is_floating_point()):
        raise BadInputError(f"checkpoint {path} holds NaN/inf values; {where}")
    return state


def _diff_keys(a: Any, b: Any) -> list[str]:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return [] if a == b else ["format"]
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_finite(leaves: Sequence[torch.Tensor], step: int) -> None:
    """TrainingDiverged if an update left a NaN/inf in a trained tensor (checked before anything is saved)."""
    for p in leaves:
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            raise TrainingDiverged(f"the update of step {step} produced NaN/inf weights; lower the learning rate "
                                   "or check the data; nothing was written")


# -- the loop ----------------------------------------------------------------------------------


def _open_reporting(config: TrainConfig, total_steps: int | None, leaves: Sequence[torch.Tensor]) -> list[Any]:
    """The run's metrics sinks (moe_unlearn.log), after one info line on what trains."""
    logger.info("%s: %s optimizer steps of %d trained tensors (%d values), lr %g", config.desc,
                total_steps if total_steps is not None else "?", len(leaves), sum(p.numel() for p in leaves),
                config.lr)
    return open_sinks(config.report_to, config.logging_dir)


def _report(sinks: Sequence[Any], step: int, metrics: Mapping[str, float]) -> None:
    for sink in sinks:
        sink.log(step, metrics)
    logger.debug("step %d: %s", step, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))


def train(
    params_or_groups: Iterable[Any],
    loss_fn: Callable[[Any], Mapping[str, torch.Tensor]],
    batches: Any,
    config: TrainConfig,
    *,
    hooks: TrainHooks | Sequence[TrainHooks] | None = None,
) -> TrainHistory:
    """Minimise `loss_fn(batch)["loss"]` over `batches` with AdamW; see the module docstring.

    params_or_groups: tensors, or torch-style param groups (dicts with "params" and optional
    "lr" / "weight_decay"). The parameters are updated in place.
    Raises TrainingDiverged on a NaN/inf loss or gradient norm, before the optimizer step
    that would apply it and without writing a checkpoint.
    """
    config.validate()
    loop = _LOOP.get()
    if loop is not None:  # another loop stands in (use_loop); it runs without this one underneath
        token = _LOOP.set(None)
        try:
            return loop(params_or_groups, loss_fn, batches, config, hooks)
        finally:
            _LOOP.reset(token)
    hook = hook_list(hooks)
    groups = _param_groups(params_or_groups)
    leaves = [p for g in groups for p in g["params"]]
    device = leaves[0].device
    amp_dtype = _autocast_dtype(config, device)

    total_steps = total_steps_of(config, batches)  # None: callable batches with epochs, unknown until the end
    optimizer, scheduler = make_optimizer(groups, config, total_steps)

    history = TrainHistory()
    step, epoch, consumed = 0, 0, 0  # consumed = micro-batches used in the current epoch
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    identity = run_identity(config)
    ckpt = latest_checkpoint(config.checkpoint_dir) if config.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, leaves, identity)
        with torch.no_grad():
            for p, v in zip(leaves, state["params"], strict=True):
                p.copy_(v.to(p.device, p.dtype))
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            step, epoch, consumed = int(state["step"]), int(state["epoch"]), int(state["consumed"])
            history = TrainHistory(**{**state["history"], "resumed_from": step})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise BadInputError(f"checkpoint {ckpt} is damaged ({_first_line(exc)}); remove "
                                f"{config.checkpoint_dir} or train without resume") from None
        if total_steps is not None and step > total_steps:
            raise BadInputError(f"checkpoint {ckpt} is at step {step}, past the {total_steps} steps asked for; "
                                f"remove {config.checkpoint_dir} or ask for more steps")
        hook.after_resume(step)

    hook.on_train_start(optimizer)
    sinks = _open_reporting(config, total_steps, leaves)
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=config.desc, dynamic_ncols=True, leave=False)

    start = time.perf_counter()
    it = _epoch_iter(batches, epoch)
    for _ in range(consumed):  # fast-forward to where the checkpoint stopped
        if next(it, None) is None:
            raise BadInputError(f"checkpoint {ckpt} is {consumed} batches into an epoch that has fewer; it "
                                "belongs to other data")
    optimizer.zero_grad(set_to_none=True)
    done = False
    try:
        while not done and (total_steps is None or step < total_steps):
            sums: dict[str, float] = {}
            n_micro = 0
            while n_micro < config.grad_accum:
                try:
                    batch = next(it)
                except StopIteration:
                    epoch, consumed = epoch + 1, 0
                    if config.epochs is not None and epoch >= config.epochs:
                        done = True
                        break
                    it = _epoch_iter(batches, epoch)
                    if n_micro:  # a step never spans two epochs: update with what this one gave
                        break
                    try:
                        batch = next(it)
                    except StopIteration:
                        raise BadInputError("train(): batches yielded nothing") from None
                consumed += 1
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = loss_fn(batch)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()).all():
                    terms = {k: _scalar(v) for k, v in out.items()}
                    raise TrainingDiverged(f"loss is {loss.item()} at step {step + 1} (terms {terms}); "
                                           "lower the learning rate or check the data; nothing was written")
                (loss / config.grad_accum).backward()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + _scalar(v)
                n_micro += 1
            if n_micro == 0:
                break
            if n_micro < config.grad_accum:  # last partial group of an epoch: average what we have
                for p in leaves:
                    if p.grad is not None:
                        p.grad.mul_(config.grad_accum / n_micro)
            hook.after_backward(step + 1)
            if config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(leaves, config.max_grad_norm))
            else:
                grads = [p.grad.detach().float().norm() for p in leaves if p.grad is not None]
                grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step + 1}; lower the learning "
                                       "rate or check the data; nothing was written")
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            hook.after_step(step)
            terms = hook.reduce_terms({k: v / n_micro for k, v in sums.items()})
            history.record(step, terms, lr_now, grad_norm)
            if step % max(1, config.log_every) == 0 or step == total_steps:
                hook.on_log(step, terms)
                _report(sinks, step, {**terms, "lr": lr_now, "grad_norm": grad_norm})
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)
            if bar is not None:
                bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                history.wall_time += time.perf_counter() - start
                start = time.perf_counter()
                check_finite(leaves, step)
                _save_checkpoint(config, {
                    "identity": identity,
                    "params": [p.detach().cpu().clone() for p in leaves],
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "step": step, "epoch": epoch, "consumed": consumed,
                    "history": history.to_dict(),
                }, step)
    finally:
        if bar is not None:
            bar.close()
        for sink in sinks:
            sink.close()
    check_finite(leaves, step)  # the last update is never followed by a loss that would catch it
    history.wall_time += time.perf_counter() - start
    history.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    logger.info("%s: %d steps in %.1f s; final %s", config.desc, step, history.wall_time,
                " ".join(f"{k}={v:.5g}" for k, v in history.final().items()))
    return history


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (Adam moments, ...)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
