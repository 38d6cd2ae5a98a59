"""Every check of an `UnlearnConfig` that needs no model, in one function.

`unlearn()` runs it first, and `moe-unlearn unlearn` runs it before it loads the model, so a typo
in a hyperparameter, a target or the output folder costs nothing and writes nothing. Each field's
type, range and choices come from its `Option` (moe_unlearn.unlearning.config); what is written
here are the rules between fields, asked of the registries (methods, scopes, projections, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moe_unlearn.arch.target import ExpertTarget
from moe_unlearn.errors import BadInputError
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.methods import get_method
from moe_unlearn.unlearning.scopes import SCOPES


def check_targets(target: Any, scope: str) -> None:
    """A target is read by the scopes that train given experts only; with another scope it would be
    silently dropped, so it is refused. Strings and pairs are parsed here (syntax); whether the layer
    and expert exist needs the model."""
    if target is None:
        return
    if not SCOPES.lookup(scope).reads_targets:
        raise BadInputError(f"a target was given, but scope {scope!r} trains no particular expert and would ignore "
                            f"it; use scope {_target_scopes()}, or drop the target")
    from moe_unlearn.attribution import Attribution

    if isinstance(target, Attribution):
        return
    items = target_list(target)
    if not items:
        raise BadInputError("the target list is empty; give LAYER:EXPERT, or no target to attribute the forget set")
    for t in items:
        ExpertTarget.coerce(t)


def target_list(target: Any) -> list[Any]:
    """`target` as a list of single targets ("L:E", (L, E), ExpertTarget), a single one wrapped."""
    single = isinstance(target, (str, ExpertTarget)) or hasattr(target, "layer") or (
        isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], int))
    return [target] if single else list(target)


def _target_scopes() -> str:
    return " or ".join(name for name, s in SCOPES.items() if s.reads_targets)


def checkpoint_dir_for(out_dir: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None,
                       checkpoint_every: int, resume: bool) -> Path | None:
    """Where checkpoints go: checkpoint_dir, else OUT.ckpt beside out_dir (when checkpointing or resuming)."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    if out_dir is not None and (checkpoint_every or resume):
        out = Path(out_dir).expanduser().resolve()
        return out.with_name(out.name + ".ckpt")
    return None


def check_unlearn_config(cfg: UnlearnConfig, *, has_retain: bool,
                         model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Every model-free check of `cfg`; returns the method's hyperparameters (defaults + overrides).
    Raises BadInputError with one message naming the option. `unlearn()` runs it first and the CLI
    before it loads the model, so both refuse the same inputs with the same message."""
    method = get_method(cfg.method)
    cfg.check_types()
    scope = SCOPES.lookup(cfg.scope)
    hp = method.hparams(cfg.method_kwargs)
    if (cfg.steps is None) == (cfg.epochs is None):
        raise BadInputError("give exactly one of steps and epochs")
    if method.needs_targets and not scope.reads_targets:
        raise BadInputError(f"method {method.name!r} {method.help}: use scope {_target_scopes()} (got {cfg.scope!r})")
    check_targets(cfg.target, cfg.scope)
    _check_retain_needs(cfg, method, has_retain)
    _check_outputs(cfg, model_dir)
    if cfg.expert_projection is not None and not scope.reads_targets:
        raise BadInputError(f"expert_projection={cfg.expert_projection!r} projects trained expert slices: use scope "
                            f"{_target_scopes()} (got {cfg.scope!r})")
    _check_adapter(cfg, method.trains)
    _check_routing(cfg)
    if cfg.distill_steps and (not method.trains or cfg.adapter is not None):
        raise BadInputError("distill_steps noises and retrains the trained tensors themselves: it needs a training "
                            f"method without an adapter (got method {cfg.method!r}, adapter {cfg.adapter!r})")
    if cfg.sam_rho:
        if not method.trains or method.objective.forget_reference == "logits":
            raise BadInputError(f"sam_rho needs a forget loss of its own; method {cfg.method!r} has none "
                                "(use ga, graddiff, npo, simnpo or rmu)")
        if cfg.adapter is not None:
            raise BadInputError("sam_rho perturbs the trained tensors themselves; it does not combine with an adapter")
    if cfg.shard is not None and (cfg.merge or cfg.gradient_checkpointing):
        raise BadInputError(f"shard={cfg.shard!r} cannot be combined with "
                            f"{'merge=True (write a patch; it applies to the stock model)' if cfg.merge else 'gradient_checkpointing'}")
    if cfg.coverage is not None and not scope.picks_several:
        several = [n for n, s in SCOPES.items() if s.picks_several]
        raise BadInputError(f"coverage={cfg.coverage} selects several experts: use scope "
                            f"{' or '.join(repr(n) for n in several)} (got {cfg.scope!r})")
    return hp


def _check_retain_needs(cfg: UnlearnConfig, method: Any, has_retain: bool) -> None:
    """The options that read retain data, refused without it."""
    if has_retain:
        return
    if method.requires_retain:
        raise BadInputError(f"method {cfg.method!r} needs retain data (retain=...)")
    if cfg.retain_routing_weight:
        raise BadInputError("retain_routing_weight > 0 needs retain data (retain=...)")
    for name in ("router_projection", "expert_projection", "retain_weighting"):
        value = getattr(cfg, name)
        if value is not None and UnlearnConfig.options()[name].choices()[value].needs_retain:
            raise BadInputError(f"{name}={value!r} needs retain data (retain=...)")


def _check_outputs(cfg: UnlearnConfig, model_dir: str | os.PathLike | None) -> None:
    """out_dir / checkpoint dir: usable, and never the model's own directory."""
    from moe_unlearn.atomic import check_out_dir

    if cfg.merge and cfg.out_dir is None:
        raise BadInputError("merge=True needs out_dir (where the merged model is saved)")
    if cfg.out_dir is not None:
        check_out_dir(cfg.out_dir, model_dirs=(model_dir,), must_be_empty=True, what="out_dir")
    if (cfg.checkpoint_every or cfg.resume) and cfg.out_dir is None and cfg.checkpoint_dir is None:
        raise BadInputError("checkpoint_every / resume need out_dir or checkpoint_dir")
    ckpt = checkpoint_dir_for(cfg.out_dir, cfg.checkpoint_dir, cfg.checkpoint_every, cfg.resume)
    if ckpt is not None:
        check_out_dir(ckpt, model_dirs=(model_dir,), what="checkpoint dir")


def _check_routing(cfg: UnlearnConfig) -> None:
    """routing="frozen" / "forced" keep every router fixed: the options that act on trained routers are refused."""
    from moe_unlearn.unlearning.routing import ROUTINGS

    if ROUTINGS.lookup(cfg.routing).trains_routers:
        return
    fixed = f"routing={cfg.routing!r} keeps every router fixed"
    if cfg.scope == "routers":
        raise BadInputError(f"{fixed}, and scope 'routers' trains nothing else; choose another scope")
    for name, on in (("router_projection", cfg.router_projection is not None), ("adapter_router", cfg.adapter_router),
                     ("retain_routing_weight", bool(cfg.retain_routing_weight))):
        if on:
            raise BadInputError(f"{name} acts on trained routers, but {fixed}; drop it or use routing='learned'")
    if cfg.routing == "forced" and cfg.gradient_checkpointing:  # the recomputation in backward would route freely
        raise BadInputError("routing='forced' cannot be combined with gradient_checkpointing; use routing='frozen' "
                            "or turn gradient checkpointing off")


def _check_adapter(cfg: UnlearnConfig, trains: bool) -> None:
    if cfg.adapter is None:
        if cfg.adapter_router:
            raise BadInputError("adapter_router=True puts the router under the low-rank adapter: give adapter='lora'")
        return
    if not SCOPES.lookup(cfg.scope).adapters:
        valid = ", ".join(n for n, s in SCOPES.items() if s.adapters)
        raise BadInputError(f"adapter={cfg.adapter!r} trains low-rank deltas on expert matrices: use scope "
                            f"{valid} (got {cfg.scope!r})")
    if not trains:
        raise BadInputError(f"method {cfg.method!r} trains nothing; it takes no adapter")


__all__ = ["check_targets", "check_unlearn_config", "checkpoint_dir_for", "target_list"]
