"""DBRX: `transformer.blocks[i].ffn`; the router returns logits only; experts are 2-D
`[E*I, H]` parameters w1 (gate), v1 (up), w2 (down, stored [I, H] per expert)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.base import ExpertSlice, MoELayer, Routing
from moe_unlearn.errors import UnsupportedFamily


class DbrxLayer(MoELayer):
    """Softmax in the logits' dtype over all experts, top-K, weights divided by their
    p-norm (p = moe_normalize_expert_weights, none if unset). An expert is the row block
    [e*I, (e+1)*I) of each of w1, v1, w2."""

    routing_rule = "softmax-topk-pnorm"
    decoder_layer_lists = ("blocks",)
    block_names = ("ffn",)

    @classmethod
    def from_block(cls, *, model: nn.Module, layer_idx: int, path: str, block: nn.Module) -> MoELayer:
        return cls(model=model, layer_idx=layer_idx, path=path, block=block, router=block.router,
                   experts=block.experts, num_experts=int(block.experts.num_experts), top_k=int(block.top_k),
                   router_path=f"{path}.router", family="dbrx")

    def check(self) -> None:
        mlp = getattr(self.experts, "mlp", None)
        if mlp is None or any(getattr(mlp, n, None) is None or getattr(mlp, n).dim() != 2 for n in ("w1", "v1", "w2")):
            raise UnsupportedFamily(f"{self.path}.experts.mlp: expected 2-D w1/v1/w2 [E*I, H] (DBRX layout)")

    @property
    def _inter(self) -> int:
        return int(self.experts.ffn_hidden_size)

    def unpack_router_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        routing = self.route_from_logits(output)
        return output, routing.topk_weight.to(output.dtype), routing.topk_idx

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        probs = torch.softmax(logits, dim=1, dtype=logits.dtype)
        weight, idx = torch.topk(probs, self.top_k, dim=-1)
        p = self.block.moe_normalize_expert_weights
        if p is not None:
            weight = weight / torch.norm(weight, p=p, dim=-1, keepdim=True)
        return Routing(scores=torch.softmax(logits.float(), dim=-1), topk_idx=idx, topk_weight=weight.float())

    def expert_slices(self, expert: int) -> list[ExpertSlice]:
        self.check_expert(expert)
        start, stop = int(expert) * self._inter, (int(expert) + 1) * self._inter
        mlp = self.experts.mlp
        return [ExpertSlice(self.param_name(getattr(mlp, attr)), getattr(mlp, attr), 0, start, stop, role)
                for attr, role in (("w1", "gate"), ("v1", "up"), ("w2", "down"))]

    def _expert_views(self, expert: int) -> dict[str, torch.Tensor]:
        start, n = expert * self._inter, self._inter
        mlp = self.experts.mlp
        return {"gate": mlp.w1.data.narrow(0, start, n), "up": mlp.v1.data.narrow(0, start, n),
                "down": mlp.w2.data.narrow(0, start, n).T}

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.experts.mlp.activation_fn(gate) * up
