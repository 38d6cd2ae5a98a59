"""LoRAMoELinear: a frozen nn.Linear plus a routed mixture of LoRA experts beside it.

    o = W0 x + (alpha/r) * sum_e G(x)_e * B_e A_e dropout(x),   G(x) = softmax(W_g x)

The mixture is computed by `moe_unlearn.ops.loramoe_delta` (stacked, two GEMMs and a
gate; backend chosen by the ops layer), never by a loop over experts. Dropout is sampled
once per token and shared by all experts (the official code re-samples it per expert,
which forces the loop); the router sees x without dropout, as in the official code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_unlearn.errors import MergeNotPossible
from moe_unlearn.loramoe.config import LoRAMoEConfig


class LoRAMoELinear(nn.Module):
    """Parameters: lora_A [E, r, d_in] (kaiming-uniform), lora_B [E, d_out, r] (zeros, so the
    wrapped model starts out identical to the base), router [E, d_in] (absent with router="none")."""

    def __init__(self, base: nn.Linear, config: LoRAMoEConfig, name: str = "") -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.name = name
        self.num_experts = config.num_experts
        self.rank = config.rank
        self.scale = config.scale
        self.router_type = config.router
        self.top_k = config.top_k
        E, r = config.num_experts, config.rank
        d_out, d_in = base.weight.shape
        factory = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(E, r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(E, d_out, r, **factory))
        # fan_in of the [E*r, d_in] view is d_in, the same as each expert's A_e: one call, no loop
        nn.init.kaiming_uniform_(self.lora_A.data.view(E * r, d_in), a=math.sqrt(5))
        if config.router == "none":
            self.router = None
        else:
            self.router = nn.Parameter(torch.empty(E, d_in, **factory))
            nn.init.kaiming_uniform_(self.router.data, a=math.sqrt(5))  # nn.Linear's default, as the official code
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # set by balance.routing_context for one forward pass; a plain attribute, not a submodule
        self.context = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (some model code reads `.weight` of its projections)."""
        return self.base.weight

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d_in] -> [T, E] fp32 full softmax G(x)."""
        return torch.softmax(x.float() @ self.router.float().t(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moe_unlearn import ops  # looked up per call so the dispatching entry point is used

        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        dropped = self.dropout(flat)
        if self.router is None:
            delta = ops.loramoe_delta(dropped, self.lora_A, self.lora_B,
                                      flat.new_ones(flat.shape[0], self.num_experts), scale=self.scale)
        else:
            probs = self.router_probs(flat)
            if self.context is not None:
                self.context.record(self.name, probs)
            if self.router_type == "dense":
                delta = ops.loramoe_delta(dropped, self.lora_A, self.lora_B, probs, scale=self.scale)
            else:
                weight, idx = torch.topk(probs, self.top_k, dim=-1)
                weight = weight / weight.sum(dim=-1, keepdim=True)
                delta = ops.loramoe_delta(dropped, self.lora_A, self.lora_B, topk_idx=idx, topk_weight=weight,
                                          scale=self.scale)
        return out + delta.reshape(*x.shape[:-1], -1).to(out.dtype)

    @property
    def mergeable(self) -> bool:
        """Every gate constant: no router (gates 1) or one expert (its softmax gate is 1)."""
        return self.router is None or self.num_experts == 1

    def check_mergeable(self) -> None:
        if not self.mergeable:
            raise MergeNotPossible(
                f"{self.name or 'LoRAMoE layer'}: a routed mixture of {self.num_experts} LoRA experts cannot be "
                "merged into the base weight, because its gates G(x) depend on each token, so "
                "sum_e G(x)_e B_e A_e is not one fixed matrix. Keep the adapter loaded (load_loramoe) for "
                "inference, or train with router='none' (plain LoRA: method='lora') if you need a mergeable adapter.")

    def delta_weight(self) -> torch.Tensor:
        """[d_out, d_in] = scale * sum_e B_e A_e in fp32: the fixed update of a mergeable layer."""
        self.check_mergeable()
        return self.scale * torch.einsum("eor,eri->oi", self.lora_B.float(), self.lora_A.float())

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with the delta added to its weight (the base module itself, updated)."""
        delta = self.delta_weight()
        self.base.weight.copy_((self.base.weight.float() + delta).to(self.base.weight.dtype))
        return self.base

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
                f"scale={self.scale:g}, router={self.router_type}"
                + (f", top_k={self.top_k}" if self.router_type == "topk" else ""))
