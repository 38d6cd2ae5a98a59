"""The one interface over every MoE family: `MoELayer`, `Routing`, `ExpertSlice`.

Family adapters (families.py) subclass `MoELayer` and fill in how the family
routes and where each expert's weights sit inside the fused tensors. No other
module of the library branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Routing of T tokens through one MoE layer.

    scores:      [T, E] fp32, the full per-expert score distribution before top-K
                 (softmax for softmax routers, sigmoid for DeepSeek-V3-style routers).
    topk_idx:    [T, K] int64, the experts each token is sent to.
    topk_weight: [T, K] fp32, the weights the block multiplies expert outputs by
                 (after renormalisation / scaling, exactly as the model applies them).
    """

    scores: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor

    def gate_values(self) -> torch.Tensor:
        """[T, E] fp32: the full score where the expert is in the token's top-K, else 0
        (the g_{i,t} of SEUF's affinity score)."""
        gates = torch.zeros_like(self.scores)
        return gates.scatter(1, self.topk_idx, self.scores.gather(1, self.topk_idx))


@dataclass(frozen=True)
class ExpertSlice:
    """The part of one parameter that belongs to one routed expert:
    `param.narrow(dim, start, stop - start)`.

    role names what the slice holds: "gate_up", "gate", "up", "down", "gate_up_bias",
    "down_bias", ... so that views are readable without knowing the layout.
    """

    name: str  # qualified parameter name in model.named_parameters()
    param: nn.Parameter
    dim: int
    start: int
    stop: int
    role: str

    def view(self) -> torch.Tensor:
        """A view (no copy) of the expert's part of the parameter's data."""
        return self.param.data.narrow(self.dim, self.start, self.stop - self.start)

    def grad_view(self) -> torch.Tensor | None:
        if self.param.grad is None:
            return None
        return self.param.grad.narrow(self.dim, self.start, self.stop - self.start)

    @property
    def numel(self) -> int:
        return self.view().numel()


class MoELayer:
    """One sparse MoE block of a model, seen through the family's adapter."""

    family: str = "generic"

    def __init__(
        self,
        *,
        model: nn.Module,
        layer_idx: int,
        path: str,
        block: nn.Module,
        router: nn.Module,
        experts: nn.Module,
        num_experts: int,
        top_k: int,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        self.layer_idx = layer_idx
        self.path = path
        self.block = block
        self.router = router
        self.experts = experts
        self.num_experts = num_experts
        self.top_k = top_k
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    # -- identity ---------------------------------------------------------
    @property
    def has_shared_experts(self) -> bool:
        return self.shared_experts is not None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layer={self.layer_idx}, path={self.path!r}, experts={self.num_experts}, "
                f"top_k={self.top_k}, shared={self.has_shared_experts})")

    def param_name(self, param: nn.Parameter) -> str:
        return self._names[id(param)]

    # -- routing ----------------------------------------------------------
    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] block-input hidden states -> [T, E] router logits, as the router computes them."""
        return self.router(hidden.reshape(-1, hidden.shape[-1]))[0]

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] router logits -> [T, E] fp32 full score distribution (before top-K)."""
        return torch.softmax(logits.float(), dim=-1)

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        """Top-K selection and gate weights from router logits, exactly as the model does it."""
        raise NotImplementedError

    def route(self, hidden: torch.Tensor) -> Routing:
        """Route block-input hidden states [T, H] (or [B, S, H])."""
        return self.route_from_logits(self.router_logits(hidden))

    def router_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters of this layer's router (weight, and bias where present)."""
        return [(self.param_name(p), p) for p in self.router.parameters()]

    # -- expert weights ---------------------------------------------------
    def expert_slices(self, expert: int) -> list[ExpertSlice]:
        """Which slices of which parameters hold routed expert `expert`."""
        raise NotImplementedError

    def _check_expert(self, expert: int) -> None:
        from moe_unlearn.errors import BadInputError

        if not 0 <= int(expert) < self.num_experts:
            raise BadInputError(
                f"expert {expert} out of range for layer {self.layer_idx}: it has {self.num_experts} routed "
                f"experts (0..{self.num_experts - 1})")

    def get_expert(self, expert: int) -> dict[str, torch.Tensor]:
        """Views (no copies) of expert `expert`'s weights, keyed by role."""
        return {s.role: s.view() for s in self.expert_slices(expert)}

    @torch.no_grad()
    def set_expert(self, expert: int, weights: dict[str, torch.Tensor]) -> None:
        """Write new weights into expert `expert` in place; keys are roles from `get_expert`."""
        slices = {s.role: s for s in self.expert_slices(expert)}
        unknown = set(weights) - set(slices)
        if unknown:
            from moe_unlearn.errors import BadInputError

            raise BadInputError(f"unknown expert weight roles {sorted(unknown)}; this layer has {sorted(slices)}")
        for role, value in weights.items():
            view = slices[role].view()
            if tuple(value.shape) != tuple(view.shape):
                from moe_unlearn.errors import BadInputError

                raise BadInputError(f"{role}: expected shape {tuple(view.shape)}, got {tuple(value.shape)}")
            view.copy_(value)

    def expert_num_params(self) -> int:
        """Parameter count of one routed expert."""
        return sum(s.numel for s in self.expert_slices(0))
