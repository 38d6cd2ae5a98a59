"""DeepSeek-V2 and DeepSeek-V3 routers (fp32 logits; shared experts `shared_experts`;
the first `first_k_dense_replace` decoder layers are dense and are skipped by discovery)."""

from __future__ import annotations

import torch

from moe_unlearn.arch.base import Routing
from moe_unlearn.arch.fused import FusedGateUpLayer
from moe_unlearn.errors import UnsupportedFamily


def _group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """[T, G] group scores -> [T, E] bool, True for experts of the `topk_group` best groups."""
    num_group = group_scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return (group_mask.unsqueeze(-1).expand(-1, num_group, num_experts // num_group)
            .reshape(-1, num_experts).bool())


class DeepseekV2Layer(FusedGateUpLayer):
    """Softmax over all experts; top-K greedy, or group-limited greedy (keep the `topk_group`
    groups with the highest max score, zero the rest, then top-K); weights are the softmax
    scores times `routed_scaling_factor`, never renormalised."""

    routing_rule = "softmax-grouped-topk-scaled"

    def check(self) -> None:
        super().check()
        method = self.router.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedFamily(f"{self.path}: DeepSeek-V2 topk_method {method!r} is not supported "
                                    f"(supported: 'greedy', 'group_limited_greedy')")

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        r = self.router
        scores = logits.float().softmax(dim=-1, dtype=torch.float32)
        chosen_from = scores
        if r.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, r.num_group, self.num_experts // r.num_group).max(dim=-1).values
            chosen_from = scores.masked_fill(~_group_mask(group_scores, r.topk_group, self.num_experts), 0.0)
        weight, idx = torch.topk(chosen_from, k=self.top_k, dim=-1, sorted=False)
        return Routing(scores=scores, topk_idx=idx, topk_weight=weight * r.routed_scaling_factor)


class DeepseekV3Layer(FusedGateUpLayer):
    """Sigmoid scores; selection on scores + e_score_correction_bias, limited to the `topk_group`
    groups whose two best biased scores sum highest; weights are the unbiased sigmoid scores,
    renormalised if `norm_topk_prob` (+1e-20), times `routed_scaling_factor`."""

    routing_rule = "sigmoid-biased-grouped-topk"
    score_kind = "sigmoid"

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        r = self.router
        scores = logits.float().sigmoid()
        for_choice = scores + r.e_score_correction_bias
        group_scores = (for_choice.view(-1, r.num_group, self.num_experts // r.num_group)
                        .topk(2, dim=-1)[0].sum(dim=-1))
        for_choice = for_choice.masked_fill(~_group_mask(group_scores, r.topk_group, self.num_experts),
                                            float("-inf"))
        idx = torch.topk(for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        weight = scores.gather(1, idx)
        if r.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(scores=scores, topk_idx=idx, topk_weight=weight * r.routed_scaling_factor)
