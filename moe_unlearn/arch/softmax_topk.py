"""Adapters of the softmax routers: softmax over all experts, then top-K (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, Qwen3-Next), or top-K of the logits, then softmax over the K (GraniteMoE)."""

from __future__ import annotations

import torch

from moe_unlearn.arch.base import Routing
from moe_unlearn.arch.fused import FusedGateUpLayer


class SoftmaxTopKLayer(FusedGateUpLayer):
    """Softmax over all experts in fp32, top-K, renormalisation of the K weights if the router's
    `norm_topk_prob` is set; the weights are cast back to the logits' dtype (Qwen2/3-MoE, OLMoE,
    Qwen3-Next). Shared experts (Qwen2-MoE, Qwen3-Next): `shared_expert` + sigmoid `shared_expert_gate`."""

    routing_rule = "softmax-topk"
    cast_weights_to_logits_dtype = True

    def _renormalize(self) -> bool:
        return bool(getattr(self.router, "norm_topk_prob", False))

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weight, idx = torch.topk(scores, self.top_k, dim=-1)
        if self._renormalize():
            weight = weight / weight.sum(dim=-1, keepdim=True)
        if self.cast_weights_to_logits_dtype:
            weight = weight.to(logits.dtype)
        return Routing(scores=scores, topk_idx=idx, topk_weight=weight.float())


class MixtralLayer(SoftmaxTopKLayer):
    """Mixtral: like Qwen but always renormalises and keeps the K weights in fp32.
    (router_jitter_noise multiplies the block input in training mode only.)"""

    routing_rule = "softmax-topk-renorm"
    cast_weights_to_logits_dtype = False

    def _renormalize(self) -> bool:
        return True


class HunyuanMoeLayer(SoftmaxTopKLayer):
    """HunYuan-MoE-V1: softmax in fp32, top-K, always renormalised, weights cast to the logits' dtype;
    router `gate.wg`; an ungated always-on `shared_mlp`."""

    routing_rule = "softmax-topk-renorm"

    def _renormalize(self) -> bool:
        return True


class LogitTopKLayer(FusedGateUpLayer):
    """GraniteMoE: fp32 logits, top-K of the logits, softmax over the K, cast to the hidden dtype.
    The full score distribution is the fp32 softmax over all experts."""

    routing_rule = "topk-logits-softmax"

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        logits = logits.float()
        top, idx = logits.topk(self.top_k, dim=-1)
        weight = torch.softmax(top, dim=-1).to(self.router.weight.dtype)
        return Routing(scores=torch.softmax(logits, dim=-1), topk_idx=idx, topk_weight=weight.float())


class ErnieMoeLayer(FusedGateUpLayer):
    """ERNIE-4.5-MoE: fp32 softmax; selection on softmax + e_score_correction_bias (a frozen
    parameter in `gate.moe_statics`); weights are the unbiased softmax scores divided by
    max(sum, moe_norm_min), cast to the hidden dtype; optional ungated `shared_experts`."""

    routing_rule = "softmax-biased-topk-renorm"

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        probs = torch.softmax(logits.float(), dim=1, dtype=torch.float32)
        idx = torch.topk(self.router.moe_statics(probs), self.top_k, dim=-1)[1]
        weight = torch.gather(probs, dim=-1, index=idx)
        weight = weight / torch.clamp(weight.sum(dim=-1, keepdim=True), min=self.router.norm_min)
        return Routing(scores=probs, topk_idx=idx, topk_weight=weight.to(self.experts.gate_up_proj.dtype).float())
