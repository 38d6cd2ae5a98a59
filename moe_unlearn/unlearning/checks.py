"""Every check of `unlearn()`'s arguments that needs no model, in one function.

`unlearn()` runs it first, and `moe-unlearn unlearn` runs it before it loads the model, so a typo
in a hyperparameter, a target or the output folder costs nothing and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_unlearn.errors import BadInputError
from moe_unlearn.training import LR_SCHEDULES
from moe_unlearn.unlearning.objectives import get_objective
from moe_unlearn.unlearning.scopes import SCOPES, ExpertTarget
from moe_unlearn.validate import check_choice, check_int, check_number

TARGET_SCOPES = ("uoe", "topm")  # the scopes that read `target`


def check_targets(target: Any, scope: str) -> None:
    """A target is read by uoe / topm only; with another scope it would be silently dropped, so it is refused.
    Strings and pairs are parsed here (syntax); whether the layer and expert exist needs the model."""
    if target is None:
        return
    if scope not in TARGET_SCOPES:
        raise BadInputError(f"a target was given, but scope {scope!r} trains no particular expert and would ignore "
                            f"it; use scope uoe or topm, or drop the target")
    from moe_unlearn.attribution import Attribution

    if isinstance(target, Attribution):
        return
    single = isinstance(target, (str, ExpertTarget)) or hasattr(target, "layer") or (
        isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], int))
    items = [target] if single else list(target)
    if not items:
        raise BadInputError("the target list is empty; give LAYER:EXPERT, or no target to attribute the forget set")
    for t in items:
        ExpertTarget.coerce(t)


def check_unlearn_args(*, method: str, scope: str, target: Any = None, top_m: int = 2, topm_layer: int | None = None,
                       steps: int | None = 20, epochs: int | None = None, lr: float = 1e-4, batch_size: int = 4,
                       grad_accum: int = 1, max_length: int = 256, lr_schedule: str = "constant",
                       warmup_steps: int = 0, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                       anchor_weight: float = 1.0, retain_routing_weight: float = 0.0,
                       method_kwargs: Mapping[str, Any] | None = None, prefix_cache_mb: float = 1024,
                       checkpoint_every: int = 0, seed: int = 0, has_retain: bool = False, merge: bool = False,
                       out_dir: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None,
                       resume: bool = False, checkpoint_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check every argument that needs no model; returns the method's hyperparameters (defaults + overrides).
    Raises BadInputError with one message naming the argument."""
    from moe_unlearn.atomic import check_out_dir

    objective = get_objective(method)
    if scope not in SCOPES:
        raise BadInputError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    hp = objective.hparams(method_kwargs)
    if (steps is None) == (epochs is None):
        raise BadInputError("give exactly one of steps and epochs")
    if steps is not None:
        check_int("steps", steps, low=1)
    if epochs is not None:
        check_int("epochs", epochs, low=1)
    check_number("lr", lr, low=0.0, low_open=True)
    check_int("batch_size", batch_size, low=1)
    check_int("grad_accum", grad_accum, low=1)
    check_int("max_length", max_length, low=2)  # one position to predict needs two tokens
    check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    check_int("warmup_steps", warmup_steps, low=0)
    check_number("weight_decay", weight_decay, low=0.0)
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, low=0.0)
    check_number("anchor_weight", anchor_weight, low=0.0)
    check_number("retain_routing_weight", retain_routing_weight, low=0.0)
    check_number("prefix_cache_mb", prefix_cache_mb, low=0.0)
    check_int("checkpoint_every", checkpoint_every, low=0)
    check_int("seed", seed, low=0)
    check_int("top_m", top_m, low=1)
    if topm_layer is not None:
        check_int("topm_layer", topm_layer, low=0)
    check_targets(target, scope)
    if objective.requires_retain and not has_retain:
        raise BadInputError(f"method {method!r} needs retain data (retain=...)")
    if retain_routing_weight and not has_retain:
        raise BadInputError("retain_routing_weight > 0 needs retain data (retain=...)")
    if merge and out_dir is None:
        raise BadInputError("merge=True needs out_dir (where the merged model is saved)")
    if out_dir is not None:
        check_out_dir(out_dir, model_dirs=(model_dir,), must_be_empty=True, what="out_dir")
    if (checkpoint_every or resume) and out_dir is None and checkpoint_dir is None:
        raise BadInputError("checkpoint_every / resume need out_dir or checkpoint_dir")
    ckpt = checkpoint_dir_for(out_dir, checkpoint_dir, checkpoint_every, resume)
    if ckpt is not None:
        check_out_dir(ckpt, model_dirs=(model_dir,), what="checkpoint dir")
    return hp


def checkpoint_dir_for(out_dir: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None,
                       checkpoint_every: int, resume: bool) -> Path | None:
    """Where checkpoints go: checkpoint_dir, else OUT.ckpt beside out_dir (when checkpointing or resuming)."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    if out_dir is not None and (checkpoint_every or resume):
        out = Path(out_dir).expanduser().resolve()
        return out.with_name(out.name + ".ckpt")
    return None


def check_unlearn_config(cfg: Any, *, has_retain: bool, model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """`check_unlearn_args` on the fields of an `UnlearnConfig`, plus the config's model-free option checks
    (loss tokens, MoE-aware variants, coverage); returns the method's hyperparameters. `unlearn()` runs it
    first and the CLI before it loads the model, so both refuse the same inputs with the same message."""
    hp = check_unlearn_args(
        method=cfg.method, scope=cfg.scope, target=cfg.target, top_m=cfg.top_m, topm_layer=cfg.topm_layer,
        steps=cfg.steps, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        max_length=cfg.max_length, lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, anchor_weight=cfg.anchor_weight,
        retain_routing_weight=cfg.retain_routing_weight, method_kwargs=cfg.method_kwargs,
        prefix_cache_mb=cfg.prefix_cache_mb, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
        has_retain=has_retain, merge=cfg.merge, out_dir=cfg.out_dir, model_dir=model_dir, resume=cfg.resume,
        checkpoint_dir=cfg.checkpoint_dir)
    from moe_unlearn.data import LOSS_TOKENS
    from moe_unlearn.unlearning.projection import EXPERT_PROJECTIONS, ROUTER_PROJECTIONS
    from moe_unlearn.unlearning.trace import RETAIN_WEIGHTINGS

    if cfg.loss_tokens not in LOSS_TOKENS:
        raise BadInputError(f"loss_tokens must be one of {', '.join(LOSS_TOKENS)}, got {cfg.loss_tokens!r}")
    for name, value, valid in (("router_projection", cfg.router_projection, ROUTER_PROJECTIONS),
                               ("expert_projection", cfg.expert_projection, EXPERT_PROJECTIONS),
                               ("retain_weighting", cfg.retain_weighting, RETAIN_WEIGHTINGS)):
        if value not in valid:
            raise BadInputError(f"{name} must be one of {[v for v in valid if v]} or None, got {value!r}")
        if value is not None and not has_retain:
            raise BadInputError(f"{name}={value!r} needs retain data (retain=...)")
    if cfg.expert_projection is not None and cfg.scope not in TARGET_SCOPES:
        raise BadInputError(f"expert_projection={cfg.expert_projection!r} projects trained expert slices: use scope "
                            f"uoe or topm (got {cfg.scope!r})")
    check_number("projection_energy", cfg.projection_energy, low=0.0, high=1.0, low_open=True)
    _check_adapter(cfg)
    if cfg.coverage is not None:
        if cfg.scope != "topm":
            raise BadInputError(f"coverage={cfg.coverage} selects several experts: use scope 'topm' "
                                f"(got {cfg.scope!r})")
        check_number("coverage", cfg.coverage, low=0.0, high=1.0, low_open=True)
    return hp


ADAPTER_SCOPES = ("uoe", "topm", "experts")  # the scopes whose expert matrices an adapter can hold


def _check_adapter(cfg: Any) -> None:
    from moe_unlearn.unlearning.adapters import ADAPTERS
    from moe_unlearn.validate import check_int

    if cfg.adapter not in ADAPTERS:
        raise BadInputError(f"adapter must be one of {[a for a in ADAPTERS if a]} or None, got {cfg.adapter!r}")
    if cfg.adapter is None:
        if cfg.adapter_router:
            raise BadInputError("adapter_router=True puts the router under the low-rank adapter: give adapter='lora'")
        return
    if cfg.scope not in ADAPTER_SCOPES:
        raise BadInputError(f"adapter={cfg.adapter!r} trains low-rank deltas on expert matrices: use scope "
                            f"{', '.join(ADAPTER_SCOPES)} (got {cfg.scope!r})")
    if cfg.method == "ablate":
        raise BadInputError("method 'ablate' trains nothing; it takes no adapter")
    check_int("adapter_rank", cfg.adapter_rank, low=1)
    check_int("adapter_gram_rank", cfg.adapter_gram_rank, low=0)
    if not isinstance(cfg.adapter_router, bool):
        raise BadInputError(f"adapter_router must be true or false, got {cfg.adapter_router!r}")
