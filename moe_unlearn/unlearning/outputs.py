"""Stage 9, outputs: the patch (or merged model) of a run, written by rank 0, and the result.

patch.json records what produced the patch: the method, scope and targets, the hyperparameters
(the method's, and the config fields whose Option says `record`), the final loss terms, the whole
config (so `--config patch.json` replays the run) and the data paths.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.atomic import atomic_dir, check_out_dir
from moe_unlearn.distributed import barrier
from moe_unlearn.errors import TrainingDiverged
from moe_unlearn.training import TrainHistory
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.methods import Method
from moe_unlearn.unlearning.patch import write_patch
from moe_unlearn.unlearning.plan import Plan
from moe_unlearn.unlearning.references import References
from moe_unlearn.unlearning.runner import restore_originals
from moe_unlearn.unlearning.tensor import TrainedTensor


@dataclass
class UnlearnResult:
    """What a run produced. patch_path: the patch directory (None with merge or without out_dir)."""

    patch_path: Path | None
    merged_path: Path | None
    method: str
    scope: str
    targets: list[str]
    history: TrainHistory
    trainable_params: int
    optimizer_state_bytes: int
    wall_time: float
    final_terms: dict[str, float] = field(default_factory=dict)
    prefix_cache_start: int | None = None  # first layer run per step (None = whole model)
    details: dict[str, Any] = field(default_factory=dict)  # projection ranks / energies, TRACE weights


def model_dir_of(model: nn.Module, model_dir: str | os.PathLike | None) -> Path | None:
    """The model's directory (given, else its config's name_or_path where that is a folder): never written."""
    cand = model_dir or getattr(getattr(model, "config", None), "_name_or_path", None)
    if cand and Path(cand).is_dir():
        return Path(cand).resolve()
    return None


def check_room(cfg: UnlearnConfig, model: nn.Module, plan: Plan, model_dir: Path | None) -> None:
    """Now that the size is known: room in out_dir for the patch (new + old values) or the merged model."""
    if cfg.out_dir is None:
        return
    scope = plan.scope
    need = (sum(p.numel() * p.element_size() for p in model.parameters()) if cfg.merge
            else 2 * sum(p.element_size() * p.numel() for _, p in scope.whole)
            + 2 * sum(s.numel * s.param.element_size() for s in scope.slices))
    check_out_dir(Path(cfg.out_dir), model_dirs=(model_dir,), must_be_empty=True, what="out_dir", need_bytes=need)


def inputs_record(forget: Any, retain: Any, cfg: UnlearnConfig) -> dict[str, Any]:
    """The data and model paths of a run, where they are paths (so patch.json can replay it)."""
    rec: dict[str, Any] = {}
    for key, value in (("forget", forget), ("retain", retain), ("model", cfg.model_dir)):
        if isinstance(value, (str, os.PathLike)) and Path(value).exists():
            rec[key] = str(Path(value).resolve())
    return rec


@dataclass(frozen=True)
class Outcome:
    """What the training stage hands to the outputs: the history, the trainable-parameter count, the
    low-rank factors (adapters), the report details and the first layer a step ran."""

    history: TrainHistory
    trainable_params: int
    lowrank: dict[int, dict[str, Any]]
    details: dict[str, Any]
    prefix_cache_start: int | None = None
    ckpt_dir: Path | None = None  # removed once the outputs exist, unless it existed before the run
    ckpt_existed: bool = False


def write_outputs(cfg: UnlearnConfig, method: Method, hp: dict[str, Any], model: nn.Module, plan: Plan,
                  ref: References, outcome: Outcome, *, forget: Any, retain: Any, rank: int, t0: float) -> UnlearnResult:
    """The patch (or merged model), written by rank 0 only, and the result; on any error the model's
    original values are put back (nothing was written)."""
    targets = [str(t) for t in plan.targets]
    replay = cfg.to_dict()
    replay["target"] = targets or replay["target"]  # an attribution is recorded as the targets it gave
    replay["out_dir"] = None  # a replay writes somewhere new
    history = outcome.history
    info = {"method": cfg.method, "scope": cfg.scope, "targets": targets,
            "hyperparameters": {**hp, **(cfg.record() if method.trains else {})},
            **outcome.details,
            "final_terms": history.final(), "steps_run": len(history.steps),
            "trainable_params": outcome.trainable_params,
            "config": replay, "inputs": inputs_record(forget, retain, cfg)}
    out_path = Path(cfg.out_dir) if cfg.out_dir is not None else None
    patch_path = merged_path = None
    try:
        if out_path is not None and cfg.merge:
            merged_path = out_path
            if rank == 0:  # every rank holds the same weights; one writes
                save_merged(model, out_path, plan.tensors)
        elif out_path is not None:
            patch_path = out_path
            if rank == 0:
                write_patch(out_path, model, list(plan.tensors), ref.originals, info, lowrank=outcome.lowrank,
                            grams=ref.grams)
    except BaseException:
        restore_originals(model, plan.tensors, ref.originals)  # nothing was written: the model as it was, too
        raise
    if outcome.ckpt_dir is not None and not outcome.ckpt_existed and out_path is not None and rank == 0:
        shutil.rmtree(outcome.ckpt_dir, ignore_errors=True)
    barrier()  # no rank returns before the patch exists
    return UnlearnResult(patch_path=patch_path, merged_path=merged_path, method=cfg.method, scope=cfg.scope,
                         targets=targets, history=history, trainable_params=outcome.trainable_params,
                         optimizer_state_bytes=history.optimizer_state_bytes,
                         wall_time=time.perf_counter() - t0, final_terms=history.final(),
                         prefix_cache_start=outcome.prefix_cache_start, details=outcome.details)


def save_merged(model: nn.Module, out_dir: Path, tensors: tuple[TrainedTensor, ...] | list[TrainedTensor]) -> Path:
    """save_pretrained into a temp dir beside out_dir, then rename (no half-written model); refused
    (nothing written) when a trained tensor holds NaN/inf."""
    params = canonical_parameters(model)
    for t in tensors:
        v = t.view(params)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TrainingDiverged(f"{t.name} holds NaN/inf values after unlearning; nothing was written")
    with atomic_dir(out_dir) as tmp:  # an existing out_dir can only be empty here (checked by the caller)
        model.save_pretrained(tmp)
    return out_dir


__all__ = ["Outcome", "UnlearnResult", "check_room", "inputs_record", "model_dir_of", "save_merged", "write_outputs"]
