"""GPT-OSS: router with bias, top-K of the logits then softmax over the K; experts transposed
and interleaved with biases, and a clamped SwiGLU."""

from __future__ import annotations

import torch

from moe_unlearn.arch.base import ExpertSlice, MoELayer, Routing
from moe_unlearn.errors import UnsupportedFamily


class GptOssLayer(MoELayer):
    """Experts: gate_up_proj [E, H, 2I] with gate = [..., ::2], up = [..., 1::2],
    gate_up_proj_bias [E, 2I], down_proj [E, I, H], down_proj_bias [E, H].
    The full score distribution is the fp32 softmax over all (biased) logits."""

    routing_rule = "topk-logits-softmax"

    def check(self) -> None:
        gu = getattr(self.experts, "gate_up_proj", None)
        down = getattr(self.experts, "down_proj", None)
        if gu is None or down is None or gu.dim() != 3 or gu.shape[0] != self.num_experts \
                or gu.shape[2] != 2 * down.shape[1] or not hasattr(self.experts, "gate_up_proj_bias"):
            raise UnsupportedFamily(f"{self.path}.experts: expected GPT-OSS layout gate_up_proj [E, H, 2I], "
                                    f"down_proj [E, I, H]")

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        weight = torch.softmax(top, dim=1, dtype=top.dtype)
        return Routing(scores=torch.softmax(logits.float(), dim=-1), topk_idx=idx, topk_weight=weight.float())

    def expert_slices(self, expert: int) -> list[ExpertSlice]:
        self.check_expert(expert)
        e = int(expert)
        out = []
        for attr, role in (("gate_up_proj", "gate_up"), ("gate_up_proj_bias", "gate_up_bias"),
                           ("down_proj", "down"), ("down_proj_bias", "down_bias")):
            p = getattr(self.experts, attr)
            out.append(ExpertSlice(self.param_name(p), p, 0, e, e + 1, role))
        return out

    def _expert_views(self, expert: int) -> dict[str, torch.Tensor]:
        ex = self.experts
        gate_up, gate_up_bias = ex.gate_up_proj.data[expert], ex.gate_up_proj_bias.data[expert]  # [H, 2I], [2I]
        return {"gate": gate_up[:, ::2].T, "up": gate_up[:, 1::2].T, "down": ex.down_proj.data[expert].T,
                "gate_bias": gate_up_bias[::2], "up_bias": gate_up_bias[1::2],
                "down_bias": ex.down_proj_bias.data[expert]}

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        gate = gate.clamp(min=None, max=ex.limit)
        up = up.clamp(min=-ex.limit, max=ex.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * ex.alpha))
