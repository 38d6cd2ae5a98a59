"""Unlearning: objectives (a registry of loss functions), scopes, router anchor, reversible patches.

    result = unlearn(model, forget, retain, tokenizer=tok, method="npo", scope="uoe", out_dir="patch/")
    revert_patch(model, result.patch_path)
    # low-rank adapters per request, fused into one patch (moe_unlearn.unlearning.adapters / .fusion)
    fuse_patches(model, [p1, p2], "patches/fused")
"""

from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.engine import UnlearnResult, unlearn
from moe_unlearn.unlearning.fusion import fuse_patches
from moe_unlearn.unlearning.methods import METHODS, Method
from moe_unlearn.unlearning.objectives import OBJECTIVES, Objective, ObjectiveInputs, get_objective
from moe_unlearn.unlearning.patch import apply_patch, read_patch_meta, revert_patch
from moe_unlearn.unlearning.routing import ROUTINGS
from moe_unlearn.unlearning.scopes import SCOPES, ExpertTarget, ScopePlan, SliceParams, resolve_scope

__all__ = ["METHODS", "OBJECTIVES", "ROUTINGS", "SCOPES", "Method", "ExpertTarget", "Objective", "ObjectiveInputs", "ScopePlan", "SliceParams",
           "UnlearnConfig", "UnlearnResult", "apply_patch", "fuse_patches", "get_objective", "read_patch_meta", "resolve_scope", "revert_patch",
           "unlearn"]

