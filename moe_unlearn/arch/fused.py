"""The expert layout shared by most transformers-5 MoE families.

`experts.gate_up_proj [E, 2I, H]` (gate rows first, then up rows) and
`experts.down_proj [E, H, I]`, no biases: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V2/V3, PhiMoE, GraniteMoE, Qwen3-Next.
"""

from __future__ import annotations

import torch

from moe_unlearn.arch.base import ExpertSlice, MoELayer
from moe_unlearn.errors import UnsupportedFamily


class FusedGateUpLayer(MoELayer):
    """MoELayer whose experts are fused as gate_up_proj [E, 2I, H] + down_proj [E, H, I]."""

    def check(self) -> None:
        gu = getattr(self.experts, "gate_up_proj", None)
        down = getattr(self.experts, "down_proj", None)
        if gu is None or down is None or gu.dim() != 3 or gu.shape[0] != self.num_experts \
                or gu.shape[1] != 2 * down.shape[2]:
            raise UnsupportedFamily(
                f"{self.path}.experts: expected fused gate_up_proj [E, 2I, H] and down_proj [E, H, I] "
                f"for {type(self).__name__}; this transformers version lays experts out differently")

    def expert_slices(self, expert: int) -> list[ExpertSlice]:
        self.check_expert(expert)
        e = int(expert)
        out = []
        for attr, role in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            p = getattr(self.experts, attr)
            out.append(ExpertSlice(self.param_name(p), p, 0, e, e + 1, role))
        return out

    def _expert_views(self, expert: int) -> dict[str, torch.Tensor]:
        gate_up = self.experts.gate_up_proj.data[expert]  # [2I, H]
        inter = gate_up.shape[0] // 2
        return {"gate": gate_up[:inter], "up": gate_up[inter:], "down": self.experts.down_proj.data[expert]}
