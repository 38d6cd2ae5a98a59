"""Stage 8, fit: the shared training loop (moe_unlearn.training) over the plan's trainable
parameters, or, for a method that trains nothing, its edit applied once.

On any error the original values are written back; the model's train/eval mode and requires_grad
flags are restored either way.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.distributed import GradAllReduce, RankShard
from moe_unlearn.errors import TrainingDiverged
from moe_unlearn.identity import batches_hash, config_hash
from moe_unlearn.training import TrainConfig, TrainHistory, TrainHooks, train
from moe_unlearn.unlearning.batches import Batches, ForgetRetainPairs
from moe_unlearn.unlearning.checkpointing import checkpointed
from moe_unlearn.unlearning.checks import checkpoint_dir_for
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.methods import Method
from moe_unlearn.unlearning.outputs import Outcome
from moe_unlearn.unlearning.params import lowrank_parts, trainable_params
from moe_unlearn.unlearning.plan import Plan, decoder_layer_list, trained_layers
from moe_unlearn.unlearning.projection import build_projector
from moe_unlearn.unlearning.references import References
from moe_unlearn.unlearning.runner import restore_originals


@dataclass(frozen=True)
class World:
    """Where this process stands: its device (the model's first), rank and the number of ranks."""

    device: torch.device
    rank: int = 0
    size: int = 1


def apply_edit(method: Method, model: nn.Module, plan: Plan, ref: References) -> Outcome:
    """A method that trains nothing: its edit on the plan's tensors, once."""
    params = canonical_parameters(model)
    method.edit([t.view(params) for t in plan.tensors])
    changed = sum(o.numel() for o in ref.originals)
    return Outcome(TrainHistory(), trainable_params=0, lowrank={}, details={"ablated_params": changed})


def fit(cfg: UnlearnConfig, hp: dict[str, Any], model: nn.Module, plan: Plan, batches: Batches, ref: References,
        loss_fn: Any, world: World, *, callbacks: list[TrainHooks] | None = None, was_training: bool = False,
        prefix_cache_start: int | None = None) -> Outcome:
    """Train the plan's tensors with `loss_fn` (fp32 masters for a low-precision model); the model is
    left in train mode if `was_training` (its mode before the references put it in eval mode)."""
    items: Any = ForgetRetainPairs(len(batches.forget), len(batches.retain) if batches.retain else 0, cfg.seed)
    if world.size > 1:  # data parallel: item i of an epoch is rank (i mod world)'s
        items = RankShard(items, world.rank, world.size)
        if items.dropped and world.rank == 0:
            warnings.warn(f"{items.dropped} of {len(batches.forget)} forget batches per epoch are not used: "
                          f"{world.size} ranks take equal shares", stacklevel=3)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    trained = trainable_params(plan, cfg, model)  # fp32 masters for a low-precision model; factors with an adapter
    details = dict(ref.details)
    if cfg.adapter is not None:
        details["adapter"] = {"kind": cfg.adapter, "rank": cfg.adapter_rank, "low_rank_matrices": len(trained.items),
                              "trainable_params": trained.num_trainable(), "scope_params": plan.num_trainable()}
    projector = _projector(cfg, model, plan, batches, trained, world.device)
    if projector is not None:
        details["projections"] = projector.report()
    ckpt_dir = checkpoint_dir_for(cfg.out_dir, cfg.checkpoint_dir, cfg.checkpoint_every, cfg.resume)
    ckpt_existed = ckpt_dir is not None and ckpt_dir.exists()
    try:  # (checkpoint_every / resume without out_dir or checkpoint_dir: refused by check_unlearn_config)
        shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.name in UnlearnConfig.names()}
        identity = _identity(cfg, hp, model, plan, batches) if ckpt_dir is not None else None
        config = TrainConfig(**{**shared, "steps": cfg.steps if cfg.epochs is None else None,
                                "checkpoint_every": cfg.checkpoint_every if world.rank == 0 else 0,  # rank 0 writes
                                "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None,
                                "desc": f"unlearn {cfg.method}/{cfg.scope}", "run_identity": identity})
        # order: leaves written into the model, then projected there (and read back), then the caller's hooks
        hooks: list[TrainHooks] = [trained] + ([projector] if projector else [])
        if world.size > 1:  # average the trained leaves' gradients and the logged terms over the ranks
            hooks.append(GradAllReduce(trained.leaves, trained.write_back))
        hooks += list(callbacks or [])  # the caller's hooks see averaged gradients and terms
        with checkpointed(_upper_layers(model, plan) if cfg.gradient_checkpointing else []):
            history = train(trained.leaves, loss_fn, items, config, hooks=hooks)
    except BaseException as exc:
        restore_originals(model, plan.tensors, ref.originals)  # leave the model as it was
        if isinstance(exc, TrainingDiverged) and ckpt_dir is not None and not ckpt_existed:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise
    finally:
        trained.close()
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        model.train(was_training)
    return Outcome(history, trainable_params=trained.num_trainable() if cfg.adapter else plan.num_trainable(),
                   lowrank=lowrank_parts(trained, plan), details=details, prefix_cache_start=prefix_cache_start,
                   ckpt_dir=ckpt_dir, ckpt_existed=ckpt_existed)


def _identity(cfg: UnlearnConfig, hp: dict[str, Any], model: nn.Module, plan: Plan, batches: Batches) -> dict:
    """What a checkpoint must agree on to be resumed: the config's identity fields, the targets, the
    method's hyperparameters, the model, the trained tensors and the data."""
    return {**cfg.identity(), "targets": [str(t) for t in plan.targets], "hparams": hp, "model": config_hash(model),
            "entries": [list(t.key) for t in plan.tensors],
            "forget": batches_hash(batches.forget), "retain": batches_hash(batches.retain or [])}


def _projector(cfg: UnlearnConfig, model: nn.Module, plan: Plan, batches: Batches, trained: Any,
               device: torch.device) -> Any:
    """The GRIP / retain-null projection hook, when one is on."""
    if cfg.router_projection is None and cfg.expert_projection is None:
        return None
    by_idx = plan.by_idx
    return build_projector(
        model, batches.retain, energy=cfg.projection_energy, device=device, slices=trained,
        router_layers=[by_idx[i] for i in plan.scope.router_layers] if cfg.router_projection else [],
        experts=[(by_idx[t.layer], int(t.expert)) for t in plan.targets if not t.shared]
        if cfg.expert_projection else [])


def _upper_layers(model: nn.Module, plan: Plan) -> list[nn.Module]:
    """The decoder layers above every trained tensor (recomputed in backward under gradient checkpointing)."""
    found = trained_layers(plan.tensors)
    last = max(found) if found else None
    return list(decoder_layer_list(model))[last + 1:] if last is not None else []


__all__ = ["World", "apply_edit", "fit"]
