"""A Hugging Face `Trainer` as the loop of `unlearn()` (or of any `moe_unlearn.training.train` call).

    from moe_unlearn.integrations.hf_trainer import unlearn_with_trainer
    result = unlearn_with_trainer(model, "forget.jsonl", "retain.jsonl", tokenizer=tok,
                                  training_args={"output_dir": "hf-out", "report_to": ["tensorboard"]},
                                  method="npo", scope="uoe", lr=1e-4, steps=20, out_dir="patch/")

`unlearn()` does everything as usual (data, targets, references, patch); only the optimisation
loop is the Trainer's, so its callbacks, logging integrations (`report_to`) and accelerate set-up
apply. The result equals `unlearn()`'s bit for bit (same loss, optimizer, schedule and data order).

Why not a bare Trainer: moe_unlearn trains small *leaf* tensors (one expert's slice of a fused
[E, ...] weight, fp32 masters of bf16 tensors) that are not `model.parameters()`. Gradient hooks move
each model gradient into its leaf during backward, so the model's own gradients stay empty. That
sets two traps, handled here:
- the Trainer zeroes only `model.parameters()` gradients: `LeafStepCallback` clears the leaves'
  after each optimizer step (otherwise they accumulate across steps and the run drifts);
- the Trainer clips the model's (empty) gradients, so clipping would do nothing:
  `UnlearnLossMixin._clip_grad_norm` clips the leaves with the run's max_grad_norm instead, and the
  logged grad_norm is theirs.
Your own Trainer subclass can take both pieces: `class T(UnlearnLossMixin, MyTrainer)` plus the
callback (`trainer_loop(trainer_class=T)` wires them).

Not supported (one clear error): checkpoint/resume through the Trainer (use unlearn's own
checkpoint_every / resume without the Trainer), data parallel, and epochs whose micro-batch count
is not a multiple of grad_accum (the Trainer would group micro-batches across epochs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from moe_unlearn.errors import BadInputError, TrainingDiverged
from moe_unlearn.training import (
    TrainConfig,
    TrainHistory,
    TrainHooks,
    autocast_dtype,
    check_finite,
    epoch_iter,
    epoch_len,
    hook_list,
    make_optimizer,
    optimizer_state_bytes,
    param_groups,
    total_steps_of,
    use_loop,
)

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
except ImportError as exc:  # pragma: no cover - transformers is a core dependency
    raise ImportError("moe_unlearn.integrations.hf_trainer needs transformers") from exc

__all__ = ["LeafStepCallback", "UnlearnLossMixin", "UnlearnTrainer", "trainer_loop", "unlearn_with_trainer"]


class _RunState:
    """What the mixin and the callback share for one run."""

    def __init__(self, leaves: list[torch.Tensor], hooks: TrainHooks, config: TrainConfig,
                 loss_fn: Callable[[Any], Mapping[str, torch.Tensor]]) -> None:
        self.leaves, self.hooks, self.config, self.loss_fn = leaves, hooks, config, loss_fn
        self.history = TrainHistory()
        self.sums: dict[str, float] = {}
        self.n_micro = 0
        self.grad_norm = 0.0
        self.lr = config.lr


class UnlearnLossMixin:
    """Trainer methods for leaf training: `compute_loss` is moe_unlearn's loss of the micro-batch
    (the model keeps its eval mode: the Trainer's train() would turn dropout on, which the built-in
    loop never does), and gradient clipping acts on the leaves. Set `moe_run` before train()."""

    moe_run: _RunState | None = None
    loss_is_scaled_for_ga = False  # divide each micro-batch loss by grad_accum, as the built-in loop does

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        run = self.moe_run
        if run is None:
            raise BadInputError("UnlearnLossMixin: no run attached; use trainer_loop / unlearn_with_trainer")
        model.eval()
        device = run.leaves[0].device
        amp = autocast_dtype(run.config, device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = run.loss_fn(inputs["moe_item"])
        loss = out["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"loss is {loss.item()} at step {self.state.global_step + 1}; lower the learning "
                                   "rate or check the data; nothing was written")
        for k, v in out.items():
            run.sums[k] = run.sums.get(k, 0.0) + float(v.detach().float().item() if torch.is_tensor(v) else v)
        run.n_micro += 1
        return (loss, out) if return_outputs else loss

    def _clip_grad_norm(self, model):
        """The leaves' gradient norm, clipped to the run's max_grad_norm (trap 2: the model's are empty)."""
        run = self.moe_run
        run.hooks.after_backward(self.state.global_step + 1)
        if run.config.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(run.leaves, run.config.max_grad_norm))
        else:
            grads = [p.grad.detach().float().norm() for p in run.leaves if p.grad is not None]
            norm = float(torch.stack(grads).norm()) if grads else 0.0
        if not math.isfinite(norm):
            raise TrainingDiverged(f"gradient norm is {norm} at step {self.state.global_step + 1}; lower the "
                                   "learning rate or check the data; nothing was written")
        run.grad_norm = norm
        run.lr = self.optimizer.param_groups[0]["lr"]
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        return self.moe_run.grad_norm if self.moe_run is not None else grad_norm


class UnlearnTrainer(UnlearnLossMixin, Trainer):
    """A Trainer with `UnlearnLossMixin`; `trainer_loop` adds `LeafStepCallback`."""


class LeafStepCallback(TrainerCallback):
    """After each optimizer step: clear the leaves' gradients (trap 1: the Trainer zeroes only the
    model's), run moe_unlearn's hooks (the leaves are written back into the model there) and record
    the step's averaged loss terms."""

    def __init__(self, run: _RunState) -> None:
        self.run = run

    def on_step_end(self, args, state, control, **kwargs):
        run = self.run
        for p in run.leaves:
            p.grad = None
        step = state.global_step
        run.hooks.after_step(step)
        terms = run.hooks.reduce_terms({k: v / max(1, run.n_micro) for k, v in run.sums.items()})
        run.history.record(step, terms, run.lr, run.grad_norm)
        if step % max(1, run.config.log_every) == 0 or step == state.max_steps:
            run.hooks.on_log(step, terms)
        run.sums, run.n_micro = {}, 0
        return control


class _Items(torch.utils.data.IterableDataset):
    """The micro-batch items of every epoch, in the built-in loop's order, `total` of them."""

    def __init__(self, batches: Any, total: int) -> None:
        self.batches, self.total = batches, total

    def __iter__(self) -> Iterator[Any]:
        n, epoch = 0, 0
        while n < self.total:
            got = False
            for item in epoch_iter(self.batches, epoch):
                got = True
                yield item
                n += 1
                if n >= self.total:
                    return
            if not got:
                return
            epoch += 1


def _first(features: Sequence[Any]) -> dict[str, Any]:
    # one item = one micro-batch, built by the loss function itself; the tensor lets accelerate's
    # data loader find a batch size of 1
    return {"moe_batch": torch.ones(1), "moe_item": features[0]}


def _training_args(base: TrainingArguments | Mapping[str, Any] | None, config: TrainConfig, steps: int,
                   device: torch.device) -> TrainingArguments:
    """The Trainer's arguments: the caller's (output_dir, report_to, logging, ...) with what the run
    fixes (steps, accumulation, one micro-batch per item, no Trainer checkpoints, no mixed precision:
    the loss autocasts as the built-in loop does)."""
    fixed = dict(max_steps=steps, num_train_epochs=1, gradient_accumulation_steps=config.grad_accum,
                 per_device_train_batch_size=1, learning_rate=config.lr, weight_decay=config.weight_decay,
                 warmup_steps=config.warmup_steps, seed=config.seed, bf16=False, fp16=False,
                 max_grad_norm=config.max_grad_norm or 1.0,  # > 0 so the Trainer calls _clip_grad_norm
                 save_strategy="no", remove_unused_columns=False, dataloader_num_workers=0,
                 disable_tqdm=not config.progress, use_cpu=device.type == "cpu")
    if base is None:
        base = {}
    if isinstance(base, Mapping):
        opts = {"output_dir": "hf_trainer_out", "report_to": "none", "logging_steps": config.log_every, **base}
        bad = sorted(set(opts) - {f.name for f in dataclasses.fields(TrainingArguments)})
        if bad:
            raise BadInputError(f"unknown TrainingArguments {bad}")
        return TrainingArguments(**{**opts, **fixed})
    return dataclasses.replace(base, **fixed)


def _trainer_run(training_args: Any, trainer_class: type, callbacks: Sequence[Any], trainer_kwargs: Mapping[str, Any]):
    def loop(params_or_groups: Any, loss_fn: Callable, batches: Any, config: TrainConfig,
             hooks: TrainHooks | Sequence[TrainHooks] | None) -> TrainHistory:
        if config.resume or config.checkpoint_every:
            raise BadInputError("checkpoint_every / resume are not supported with the HF Trainer loop; drop them, "
                                "or run unlearn() without the Trainer")
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise BadInputError("the HF Trainer loop runs in one process; use unlearn() under torchrun for data parallel")
        if not issubclass(trainer_class, UnlearnLossMixin):
            raise BadInputError(f"trainer_class {trainer_class.__name__} must mix in UnlearnLossMixin "
                                "(class T(UnlearnLossMixin, YourTrainer))")
        per_epoch = epoch_len(batches)
        if config.epochs is not None and (per_epoch is None or per_epoch % config.grad_accum):
            raise BadInputError(f"with epochs, the micro-batches per epoch ({per_epoch}) must be a known multiple of "
                                f"grad_accum ({config.grad_accum}) for the Trainer loop; use steps")
        steps = total_steps_of(config, batches)
        hook = hook_list(hooks)
        groups = param_groups(params_or_groups)
        leaves = [p for g in groups for p in g["params"]]
        optimizer, scheduler = make_optimizer(groups, config, steps)
        torch.manual_seed(config.seed)
        run = _RunState(leaves, hook, config, loss_fn)
        model = trainer_kwargs.get("model")
        if model is None:
            raise BadInputError("the HF Trainer loop needs the model (trainer_loop(model=...) or unlearn_with_trainer)")
        args = _training_args(training_args, config, steps, leaves[0].device)
        trainer = trainer_class(model=model, args=args, train_dataset=_Items(batches, steps * config.grad_accum),
                                data_collator=_first, optimizers=(optimizer, scheduler),
                                callbacks=[LeafStepCallback(run), *callbacks],
                                **{k: v for k, v in trainer_kwargs.items() if k != "model"})
        trainer.moe_run = run
        hook.on_train_start(optimizer)
        was_training = model.training
        start = time.perf_counter()
        try:
            trainer.train()
        finally:
            model.train(was_training)
        check_finite(leaves, len(run.history.steps))
        run.history.wall_time = time.perf_counter() - start
        run.history.optimizer_state_bytes = optimizer_state_bytes(optimizer)
        return run.history

    return loop


@contextmanager
def trainer_loop(model: Any, training_args: TrainingArguments | Mapping[str, Any] | None = None, *,
                 trainer_class: type = UnlearnTrainer, callbacks: Sequence[Any] = (),
                 **trainer_kwargs: Any) -> Iterator[None]:
    """Inside this block, the training loop of `unlearn()` (any `moe_unlearn.training.train`) is a
    `trainer_class` Trainer on `model`. training_args: TrainingArguments or a dict of them (output_dir,
    report_to, logging_steps, ...); the run's own knobs (steps, lr, grad_accum, seed, ...) come from
    the unlearning config and override theirs. callbacks: extra TrainerCallbacks."""
    with use_loop(_trainer_run(training_args, trainer_class, callbacks, {"model": model, **trainer_kwargs})):
        yield


def unlearn_with_trainer(model: Any, forget: Any, retain: Any = None, *, tokenizer: Any = None,
                         training_args: TrainingArguments | Mapping[str, Any] | None = None,
                         trainer_class: type = UnlearnTrainer, trainer_callbacks: Sequence[Any] = (),
                         **options: Any):
    """`unlearn(model, forget, retain, tokenizer=..., **options)` with a Hugging Face Trainer as its loop."""
    from moe_unlearn.unlearning import unlearn

    with trainer_loop(model, training_args, trainer_class=trainer_class, callbacks=trainer_callbacks):
        return unlearn(model, forget, retain, tokenizer=tokenizer, **options)
