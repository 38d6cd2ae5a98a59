"""Architecture adapters, one per routing rule / expert layout.

ADAPTERS maps a transformers `config.model_type` to the `MoELayer` subclass that
reads that family. Adding a family = one small subclass + one registry line.
"""

from __future__ import annotations

import torch

from moe_unlearn.arch.base import ExpertSlice, MoELayer, Routing


class SoftmaxTopKLayer(MoELayer):
    """Softmax over all experts, top-K, optional renormalisation of the top-K weights.

    Experts fused as `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`.
    """

    family = "softmax-topk"

    def _renormalize(self) -> bool:
        return bool(getattr(self.router, "norm_topk_prob", False))

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        scores = torch.softmax(logits.float(), dim=-1)
        weight, idx = torch.topk(scores, self.top_k, dim=-1)
        if self._renormalize():
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return Routing(scores=scores, topk_idx=idx, topk_weight=weight)

    def expert_slices(self, expert: int) -> list[ExpertSlice]:
        self._check_expert(expert)
        out = []
        for role in ("gate_up_proj", "down_proj"):
            p = getattr(self.experts, role)
            out.append(ExpertSlice(self.param_name(p), p, 0, expert, expert + 1, role.removesuffix("_proj")))
        return out


# model_type -> adapter class
ADAPTERS: dict[str, type[MoELayer]] = {
    "qwen3_moe": SoftmaxTopKLayer,
}
