"""`ExpertTarget`: the (layer, expert) identity shared by attribution, unlearning and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_unlearn.errors import BadInputError

SHARED = "shared"  # the expert id of a layer's shared expert(s) in a target


@dataclass(frozen=True)
class ExpertTarget:
    """One expert: a routed expert index, or SHARED for the layer's shared expert(s)."""

    layer: int
    expert: int | str

    @property
    def shared(self) -> bool:
        return self.expert == SHARED

    def __str__(self) -> str:
        return f"{self.layer}:{self.expert}"

    def __iter__(self):  # so `layer, expert = target` works as for a tuple
        return iter((self.layer, self.expert))

    @classmethod
    def parse(cls, text: str) -> ExpertTarget:
        """"L:E" (e.g. "1:3") or "L:shared"."""
        parts = str(text).split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            layer = int(parts[0])
            expert: int | str = SHARED if parts[1].strip().lower() == SHARED else int(parts[1])
        except ValueError:
            raise BadInputError(f"target {text!r} is not LAYER:EXPERT (e.g. '1:3', or '1:shared')") from None
        return cls(layer, expert)

    @classmethod
    def coerce(cls, obj: Any) -> ExpertTarget:
        """Accept every spelling users and other modules produce: an ExpertTarget, "L:E", a
        (layer, expert) pair, or anything with .layer and .expert (e.g. an attribution TopEntry)."""
        if isinstance(obj, ExpertTarget):
            return obj
        if isinstance(obj, str):
            return cls.parse(obj)
        if hasattr(obj, "layer") and hasattr(obj, "expert"):
            return cls(int(obj.layer), obj.expert if obj.expert == SHARED else int(obj.expert))
        try:
            layer, expert = obj
            return cls(int(layer), expert if expert == SHARED else int(expert))
        except (TypeError, ValueError):
            raise BadInputError(f"cannot read {obj!r} as an expert target; give 'LAYER:EXPERT' or (layer, expert)"
                                ) from None
