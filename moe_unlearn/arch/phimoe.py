"""PhiMoE: the SparseMixer router (always top-2), reproduced in its eval-mode form."""

from __future__ import annotations

import torch

from moe_unlearn.arch.base import MoELayer, Routing
from moe_unlearn.arch.fused import FusedGateUpLayer


def _sparsemixer_pick(scores: torch.Tensor, masked: torch.Tensor, jitter_eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-mode SparseMixer step: the best expert of `masked` and its weight, a softmax over
    the experts whose logit lies within a relative 2*jitter_eps of that best one."""
    threshold, best = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    far = ((threshold - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(dim=-1, index=best), best


class PhimoeLayer(FusedGateUpLayer):
    """SparseMixer (eval mode): expert 1 = argmax of the logits, weighted by a softmax over the
    logits near it; expert 2 = argmax with expert 1 removed, weighted the same way. Weights are
    not renormalised and stay in the logits' dtype. Top-K is always 2 whatever the config says.
    In training mode the router samples (Gumbel), so `route` reproduces eval mode only.
    The full score distribution is the fp32 softmax over all logits."""

    routing_rule = "sparsemixer-top2"

    @classmethod
    def from_block(cls, **kwargs) -> MoELayer:
        layer = super().from_block(**kwargs)
        layer.top_k = 2  # sparsemixer ignores num_experts_per_tok
        return layer

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        eps = self.router.router_jitter_noise
        w1, i1 = _sparsemixer_pick(logits, logits, eps)
        w2, i2 = _sparsemixer_pick(logits, torch.scatter(logits, -1, i1, float("-inf")), eps)
        return Routing(scores=torch.softmax(logits.float(), dim=-1), topk_idx=torch.cat((i1, i2), dim=-1),
                       topk_weight=torch.cat((w1, w2), dim=-1).float())
