"""`METHODS`: every unlearning method by name, the training objectives and the edits that train nothing.

A method is a `Method`: an `Objective` (a loss the shared loop minimises), or an edit applied to the
planned tensors once (`ablate`, `trains=False`). Either way the run goes through the same stages
(targets, plan, outputs), so a non-training method writes the same patch or merged model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moe_unlearn.errors import BadInputError
from moe_unlearn.registry import Registry
from moe_unlearn.unlearning.ablate import ABLATE, ABLATED_ROLES, zero_
from moe_unlearn.unlearning.objectives import OBJECTIVES, Objective


@dataclass(frozen=True)
class Method:
    """One registered method.

    objective: the loss it trains (None: it trains nothing and applies `edit` to the planned tensors).
    needs_targets: it runs with the scopes that train target experts only (`Scope.reads_targets`). roles: the plan keeps only the expert slices
    of these roles and no whole tensor (None: the scope's plan as it is). routed_only: shared
    experts are refused as targets.
    """

    name: str
    objective: Objective | None = None
    edit: Callable[[list[torch.Tensor]], None] | None = None
    needs_targets: bool = False
    roles: tuple[str, ...] | None = None
    routed_only: bool = False
    help: str = ""

    @property
    def trains(self) -> bool:
        return self.objective is not None

    @property
    def requires_retain(self) -> bool:
        return self.objective is not None and self.objective.requires_retain

    def hparams(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The objective's hyperparameters (defaults + overrides); a non-training method records its roles."""
        if self.objective is not None:
            return self.objective.hparams(overrides)
        if overrides:
            raise BadInputError(f"method {self.name!r} takes no hyperparameters, got {sorted(overrides)}")
        return {"roles": list(self.roles)} if self.roles else {}


METHODS: Registry[Method] = Registry("unlearning method", "methods")
for _name in sorted(OBJECTIVES):
    METHODS.register(_name, Method(_name, objective=OBJECTIVES[_name]))
METHODS.register(ABLATE, Method(ABLATE, edit=zero_, needs_targets=True, roles=ABLATED_ROLES,
                                routed_only=True, help="removes target experts"))


def get_method(name: Any) -> Method:
    """The registered method `name`, else BadInputError listing the valid ones."""
    return METHODS.lookup(name)


__all__ = ["METHODS", "Method", "get_method"]
