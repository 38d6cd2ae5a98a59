"""`method="ablate"`: remove the target experts' contribution, train nothing.

The down-projection slice (and down bias, where the family has one) of every routed target
expert is set to zero, so the expert adds nothing to any token routed to it (its gate weight
still counts, so the block output shrinks by that share: nothing is rerouted). The change is
written as an ordinary patch, reversible bit-exactly like every patch. It is the baseline for
"how much does removing the expert cost, and how much of the forget knowledge lives
elsewhere": forget EM after ablation = what the rest of the model still knows.

It is registered in `moe_unlearn.unlearning.methods.METHODS` as a method that does not train: it
goes through the same targets, plan and outputs as every method; the plan holds exactly the
slices of `ABLATED_ROLES`, and `zero_` is its edit.
"""

from __future__ import annotations

import torch

ABLATE = "ablate"
ABLATED_ROLES = ("down", "down_bias")


@torch.no_grad()
def zero_(views: list[torch.Tensor]) -> None:
    """The ablation itself: every planned tensor (the targets' down projections) set to zero in place."""
    for v in views:
        v.zero_()


__all__ = ["ABLATE", "ABLATED_ROLES", "zero_"]
