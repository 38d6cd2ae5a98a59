"""LoRAMoEConfig: every knob of the LoRAMoE plugin, saved as JSON beside the adapter weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from moe_unlearn.errors import BadInputError
from moe_unlearn.validate import MAX_ITEMS, bounded

ROUTERS = ("dense", "topk", "none")
CONVENTIONS = ("divide", "official")
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoRAMoEConfig:
    """A mixture of `num_experts` LoRA experts of rank `rank` beside each target nn.Linear.

    router:  "dense" = softmax over all experts (the paper); "topk" = softmax, keep the
             `top_k` largest, renormalise them to sum 1; "none" = no router, every expert
             has gate 1 (with num_experts=1 this is plain LoRA, the baseline).
    target_modules: last component of the nn.Linear names to wrap. Routed experts of
             transformers 5 MoE models are fused 3-D parameters, never nn.Linear, so only
             dense MLPs, shared experts and (on request) attention projections are wrapped.
    groups:  expert counts per group (sum = num_experts), e.g. [3, 3]; group g holds
             experts sum(groups[:g]) .. sum(groups[:g+1])-1.
    group_types: the sample type each group serves (same length as groups), e.g.
             ["world", "task"]. Samples of other types (or untyped ones) do not enter the LBC.
    lbc_delta, lbc_weight: delta and beta of the localized balancing constraint
             (loss = L_ntp + lbc_weight * L_lbc). lbc_convention: see balance.py.
    """

    num_experts: int = bounded(6, low=1, high=MAX_ITEMS)
    rank: int = bounded(4, low=1, high=MAX_ITEMS)
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(FFN_TARGETS))
    router: str = "dense"
    top_k: int = bounded(2, low=1, high=MAX_ITEMS)
    groups: list[int] | None = bounded(None, low=1, high=MAX_ITEMS, max_len=MAX_ITEMS)
    group_types: list[str] | None = None
    lbc_delta: float = 0.1
    lbc_weight: float = 0.0
    lbc_convention: str = "divide"

    def __post_init__(self) -> None:
        from moe_unlearn.validate import check_fields

        check_fields(self)  # every field its declared type (a "2" is no expert count, "no" no boolean)
        self.validate()

    @property
    def scale(self) -> float:
        """alpha / r, the LoRA scaling."""
        return self.alpha / self.rank

    def validate(self) -> None:
        from moe_unlearn.validate import check_int, check_number

        check_int("num_experts", self.num_experts, low=1)
        check_int("rank", self.rank, low=1)
        check_int("top_k", self.top_k, low=1)
        check_number("alpha", self.alpha, low=0.0, low_open=True)
        check_number("dropout", self.dropout)
        check_number("lbc_delta", self.lbc_delta)
        check_number("lbc_weight", self.lbc_weight)
        if self.num_experts < 1 or self.rank < 1:
            raise BadInputError(f"num_experts and rank must be >= 1, got {self.num_experts} and {self.rank}")
        if self.router not in ROUTERS:
            raise BadInputError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.router == "topk" and not 1 <= self.top_k <= self.num_experts:  # torch.topk would fail later
            raise BadInputError(f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise BadInputError("target_modules is empty; give e.g. ['gate_proj', 'up_proj', 'down_proj']")
        if self.lbc_convention not in CONVENTIONS:
            raise BadInputError(f"lbc_convention must be one of {CONVENTIONS}, got {self.lbc_convention!r}")
        if not 0.0 <= self.lbc_delta < 1.0:
            raise BadInputError(f"lbc_delta must be in [0, 1), got {self.lbc_delta}")
        if (self.groups is None) != (self.group_types is None):
            raise BadInputError("give both groups and group_types (one type per group), or neither")
        if self.groups is not None:
            if len(self.groups) != len(self.group_types) or len(self.groups) < 1:
                raise BadInputError(f"groups {self.groups} and group_types {self.group_types} must have the "
                                    f"same, non-zero length")
            if any(g < 1 for g in self.groups) or sum(self.groups) != self.num_experts:
                raise BadInputError(f"groups {self.groups} must be positive and sum to num_experts="
                                    f"{self.num_experts}")
            if len(set(self.group_types)) != len(self.group_types):
                raise BadInputError(f"group_types {self.group_types} must be distinct")
        if self.lbc_weight < 0:
            raise BadInputError(f"lbc_weight must be >= 0, got {self.lbc_weight}")
        if self.lbc_weight > 0 and self.groups is None:
            raise BadInputError("lbc_weight > 0 needs expert groups: set groups and group_types")
        if self.lbc_weight > 0 and self.router == "none":
            raise BadInputError("the balancing constraint needs a router; use router='dense' or 'topk'")

    def expert_group(self) -> list[int]:
        """Group index of each expert (all 0 without groups)."""
        if self.groups is None:
            return [0] * self.num_experts
        return [g for g, n in enumerate(self.groups) for _ in range(n)]

    # -- JSON ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoRAMoEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BadInputError(f"unknown LoRAMoE config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LoRAMoEConfig:
        from moe_unlearn.validate import read_json_file

        data = read_json_file(path, what="LoRAMoE config", error=BadInputError)
        if not isinstance(data, dict):
            raise BadInputError(f"{path}: expected a JSON object")
        return cls.from_dict(data)
