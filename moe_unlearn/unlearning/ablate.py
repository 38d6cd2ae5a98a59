"""`method="ablate"`: remove the target experts' contribution, train nothing.

The down-projection slice (and down bias, where the family has one) of every routed target
expert is set to zero, so the expert adds nothing to any token routed to it (its gate weight
still counts, so the block output shrinks by that share: nothing is rerouted). The change is
written as an ordinary patch, reversible bit-exactly like every patch. It is the baseline for
"how much does removing the expert cost, and how much of the forget knowledge lives
elsewhere": forget EM after ablation = what the rest of the model still knows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError

ABLATE = "ablate"
ABLATED_ROLES = ("down", "down_bias")


def ablate(model: nn.Module, forget: Any, retain: Any = None, *, tokenizer: Any, scope: str, target: Any, top_m: int,
           topm_layer: int | None, coverage: float | None, batch_size: int, max_length: int, progress: bool,
           out_dir: str | None, merge: bool, model_dir: str | None) -> Any:
    """Zero the targets' down projections in place and write the patch; returns an UnlearnResult."""
    from moe_unlearn.arch import find_moe_layers
    from moe_unlearn.atomic import check_out_dir
    from moe_unlearn.training import TrainHistory
    from moe_unlearn.unlearning.engine import UnlearnResult, _model_dir, _parse_targets, _save_merged
    from moe_unlearn.unlearning.patch import PatchEntry, snapshot, write_patch

    t0 = time.perf_counter()
    if scope not in ("uoe", "topm"):
        raise BadInputError(f"method 'ablate' removes target experts: use scope uoe or topm (got {scope!r})")
    if coverage is not None and scope != "topm":
        raise BadInputError(f"coverage={coverage} selects several experts: use scope 'topm' (got {scope!r})")
    out_path = Path(out_dir) if out_dir is not None else None
    if merge and out_path is None:
        raise BadInputError("merge=True needs out_dir (where the merged model is saved)")
    if out_path is not None:  # the same check as every other method (checks.check_unlearn_args)
        check_out_dir(out_path, model_dirs=(_model_dir(model, model_dir),), must_be_empty=True, what="out_dir")
    targets = _parse_targets(target, scope, model=model, forget_source=forget, tokenizer=tokenizer, top_m=top_m,
                             topm_layer=topm_layer, batch_size=batch_size, max_length=max_length, progress=progress,
                             coverage=coverage, retain_source=retain)
    if not targets:
        raise BadInputError("method 'ablate' needs at least one target expert")
    by_idx = {lay.layer_idx: lay for lay in find_moe_layers(model)}
    entries: list[PatchEntry] = []
    for t in targets:
        if t.shared:
            raise BadInputError(f"target {t}: 'ablate' removes routed experts only, not shared ones")
        if t.layer not in by_idx:
            raise BadInputError(f"target {t}: layer {t.layer} is not an MoE layer ({sorted(by_idx)})")
        by_idx[t.layer]._check_expert(int(t.expert))
        entries += [PatchEntry(s.name, s.dim, s.start, s.stop) for s in by_idx[t.layer].expert_slices(int(t.expert))
                    if s.role in ABLATED_ROLES]
    originals = snapshot(model, entries)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for e in entries:
            e.view(params).zero_()
    zeroed = sum(o.numel() for o in originals)
    info = {"method": ABLATE, "scope": scope, "targets": [str(t) for t in targets],
            "hyperparameters": {"roles": list(ABLATED_ROLES)}, "ablated_params": zeroed, "steps_run": 0,
            "trainable_params": 0}
    patch_path = merged_path = None
    try:
        if out_path is not None and merge:
            merged_path = _save_merged(model, out_path, entries)
        elif out_path is not None:
            patch_path = write_patch(out_path, model, entries, originals, info)
    except BaseException:  # nothing was written: the model must not stay ablated either
        with torch.no_grad():
            for e, orig in zip(entries, originals, strict=True):
                view = e.view(params)
                view.copy_(orig.to(view.device))
        raise
    return UnlearnResult(patch_path=patch_path, merged_path=merged_path, method=ABLATE, scope=scope,
                         targets=[str(t) for t in targets], history=TrainHistory(), trainable_params=0,
                         optimizer_state_bytes=0, wall_time=time.perf_counter() - t0,
                         details={"ablated_params": zeroed})


__all__ = ["ABLATE", "ABLATED_ROLES", "ablate"]
