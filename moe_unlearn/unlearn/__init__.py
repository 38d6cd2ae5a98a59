"""Unlearning: objectives (a registry of loss functions), scopes, router anchor, reversible patches.

    result = unlearn(model, forget, retain, tokenizer=tok, method="npo", scope="uoe", out_dir="patch/")
    revert_patch(model, result.patch_path)
"""

from moe_unlearn.unlearn.engine import UnlearnResult, unlearn
from moe_unlearn.unlearn.objectives import OBJECTIVES, Objective, ObjectiveInputs, get_objective
from moe_unlearn.unlearn.patch import apply_patch, read_patch_meta, revert_patch
from moe_unlearn.unlearn.scopes import SCOPES, ExpertTarget, ScopePlan, SliceParams, resolve_scope

__all__ = ["OBJECTIVES", "SCOPES", "ExpertTarget", "Objective", "ObjectiveInputs", "ScopePlan", "SliceParams",
           "UnlearnResult", "apply_patch", "get_objective", "read_patch_meta", "resolve_scope", "revert_patch",
           "unlearn"]


# `moe_unlearn.unlearn` is both this subpackage and the public function (moe_unlearn._EXPORTS).
# Once the subpackage is imported, Python binds the name on the parent package to the module, so
# the module itself is made callable: `moe_unlearn.unlearn(model, ...)` always runs `unlearn`.
def _make_callable() -> None:
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return unlearn(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_callable()
