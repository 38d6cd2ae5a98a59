"""`TrainedTensor`: one tensor (or slice of one) that a run changes, the one shape the plan, the
trainable parameters, the adapters and the patch share.

A whole parameter has dim None; a slice is `param.narrow(dim, start, stop - start)` of a fused
expert tensor. `role` ("gate_up", "down", ... of an expert slice) and `owner` ((layer, expert) of an
expert slice) describe it but do not identify it: two TrainedTensors are equal when they name the
same elements, so one read back from a patch file equals the one the plan made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import PatchError

Key = tuple[str, int | None, int | None, int | None]


@dataclass(frozen=True)
class TrainedTensor:
    """A whole parameter (dim None) or the slice param.narrow(dim, start, stop - start)."""

    name: str
    dim: int | None = None
    start: int | None = None
    stop: int | None = None
    role: str | None = field(default=None, compare=False)
    owner: tuple[int, int] | None = field(default=None, compare=False)

    @classmethod
    def of_slice(cls, sl: Any, owner: tuple[int, int] | None = None) -> TrainedTensor:
        """The TrainedTensor of an `arch.base.ExpertSlice`."""
        return cls(sl.name, sl.dim, sl.start, sl.stop, role=sl.role, owner=owner)

    @property
    def key(self) -> Key:
        return (self.name, self.dim, self.start, self.stop)

    def narrow(self, t: torch.Tensor) -> torch.Tensor:
        """This tensor's part of `t` (the whole parameter's data or gradient)."""
        return t if self.dim is None else t.narrow(self.dim, self.start, self.stop - self.start)

    def view(self, params: dict[str, nn.Parameter]) -> torch.Tensor:
        """A view of its values in `params` (name -> parameter); PatchError when the model has no such tensor."""
        p = params.get(self.name)
        if p is None:
            raise PatchError(f"the model has no parameter {self.name!r}; this patch is for another model")
        if self.dim is None:
            return p.data
        if self.dim >= p.dim() or self.stop > p.shape[self.dim]:
            raise PatchError(f"slice {self.name}[dim {self.dim}, {self.start}:{self.stop}] does not fit the "
                             f"model's tensor of shape {tuple(p.shape)}; this patch is for another model")
        return p.data.narrow(self.dim, self.start, self.stop - self.start)


__all__ = ["Key", "TrainedTensor"]
