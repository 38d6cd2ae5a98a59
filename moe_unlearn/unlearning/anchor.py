"""Router terms of unlearning: the SEUF router anchor and the retain-routing (balancing) term.

Both work on the full fp32 score distribution of a layer (`MoELayer.scores_from_logits`, before
top-K), over real tokens only (padding excluded).
"""

from __future__ import annotations

import torch


def anchor_target(num_experts: int, experts: list[int], device=None) -> torch.Tensor:
    """[E] target distribution: one-hot of the target expert (SEUF); with several targets in one
    layer (topm) the mass is split evenly over them, so it is still a distribution."""
    t = torch.zeros(num_experts, device=device)
    t[list(experts)] = 1.0 / len(experts)
    return t


def router_anchor_loss(scores: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SEUF anchor: mean over real tokens and experts of (s_t - target)^2.

    scores [T, E] fp32 full softmax; mask [T] bool (True = real token); target [E]."""
    m = mask.reshape(-1).to(scores.dtype)
    sq = ((scores - target.to(scores)) ** 2).mean(-1)
    return (sq * m).sum() / m.sum().clamp_min(1)


def retain_routing_kl(ref_scores: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                      eps: float = 1e-12) -> torch.Tensor:
    """KL(original routing || current routing) per token, mean over real tokens.

    ref_scores / scores [T, E] fp32 router scores; mask [T] bool. Keeps retain data on its experts.
    Each row is normalised to sum 1 first: a no-op for softmax routers, and for sigmoid routers
    (DeepSeek-V3 style, whose scores do not sum to 1) it compares the routing preferences."""
    m = mask.reshape(-1).to(scores.dtype)
    p = ref_scores.to(scores)
    p = p / p.sum(-1, keepdim=True).clamp_min(eps)
    scores = scores / scores.sum(-1, keepdim=True).clamp_min(eps)
    kl = (p * (torch.log(p.clamp_min(eps)) - torch.log(scores.clamp_min(eps)))).sum(-1)
    return (kl * m).sum() / m.sum().clamp_min(1)
