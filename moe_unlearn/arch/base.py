"""The one interface over every MoE family: `MoELayer`, `Routing`, `ExpertSlice`.

Family adapters (softmax_topk.py, deepseek.py, gpt_oss.py, phimoe.py, dbrx.py, registered
in families.py) subclass `MoELayer` and fill in how the family routes and where each
expert's weights sit inside the fused tensors. No other module of the library branches
on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from moe_unlearn.arch.wrappers import canonical_name, peft_base_layer
from moe_unlearn.errors import BadInputError


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

    def selected(self, expert: int) -> torch.Tensor:
        """[T] bool: which tokens send to `expert`."""
        return (self.topk_idx == int(expert)).any(dim=-1)


@dataclass(frozen=True)
class ExpertSlice:
    """The part of one parameter that belongs to one routed expert:
    `param.narrow(dim, start, stop - start)`.

    role names what the slice holds: "gate_up", "down", "gate_up_bias", "down_bias"
    (fused layouts) or "gate", "up", "down" (DBRX), so that views are readable without
    knowing the layout. Training exactly these slices = masking the parameter's gradient
    outside [start, stop) along `dim`.
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

    def mask(self) -> torch.Tensor:
        """Bool tensor shaped like the parameter, True inside this slice (for gradient masking)."""
        m = torch.zeros(self.param.shape, dtype=torch.bool, device=self.param.device)
        m.narrow(self.dim, self.start, self.stop - self.start).fill_(True)
        return m

    @property
    def numel(self) -> int:
        return self.view().numel()


def _first_attr(obj: Any, names: tuple[str, ...]) -> tuple[str, Any] | tuple[None, None]:
    """(name, value) of the first attribute of `obj` in `names` that exists and is not None."""
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return name, value
    return None, None


class MoELayer:
    """One sparse MoE block of a model, seen through the family's adapter.

    Attributes every adapter sets: layer_idx (decoder-layer index), path (module path of
    the block), block, router, experts, num_experts, top_k, shared_experts (module or
    None), shared_expert_gate (module or None), family (the transformers model_type).
    Class attributes: routing_rule (a readable name of the routing rule) and score_kind
    ("softmax" or "sigmoid": what `scores_from_logits` applies).
    """

    family: str = "generic"
    routing_rule: ClassVar[str] = "generic"
    score_kind: ClassVar[str] = "softmax"
    # where discovery looks, per family
    decoder_layer_lists: ClassVar[tuple[str, ...]] = ("layers",)
    block_names: ClassVar[tuple[str, ...]] = ("mlp", "block_sparse_moe", "feed_forward", "ffn")
    router_names: ClassVar[tuple[str, ...]] = ("gate", "router")
    shared_names: ClassVar[tuple[str, ...]] = ("shared_experts", "shared_expert", "shared_mlp")

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
        router_path: str | None = None,
        family: str | None = None,
    ) -> None:
        self.layer_idx = layer_idx
        self.path = path
        self.block = block
        self.router = router
        # PEFT wraps fused expert parameters it targets in a tuner layer (ParamWrapper) that keeps the
        # experts module as `base_layer`; the expert views read the original weights
        self.experts = peft_base_layer(experts)
        self.num_experts = num_experts
        self.top_k = top_k
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate
        self.router_path = router_path or f"{path}.router"
        if family is not None:
            self.family = family
        self._names = {id(p): canonical_name(n) for n, p in model.named_parameters(remove_duplicate=False)}
        self.check()

    @classmethod
    def from_block(cls, *, model: nn.Module, layer_idx: int, path: str, block: nn.Module) -> MoELayer:
        """Build the adapter of one MoE block found by discovery (the common HF layout:
        `block.gate|router`, `block.experts`, optional `block.shared_expert(s)`)."""
        router_name, router = _first_attr(block, cls.router_names)
        if router is None or not hasattr(router, "num_experts") or not hasattr(router, "top_k"):
            from moe_unlearn.errors import UnsupportedFamily

            raise UnsupportedFamily(f"{path}: no router ({'/'.join(cls.router_names)}) with num_experts and top_k; "
                                    f"this transformers version lays the block out differently than {cls.__name__} "
                                    "expects")
        _, shared = _first_attr(block, cls.shared_names)
        return cls(model=model, layer_idx=layer_idx, path=path, block=block, router=router, experts=block.experts,
                   num_experts=int(router.num_experts), top_k=int(router.top_k), shared_experts=shared,
                   shared_expert_gate=getattr(block, "shared_expert_gate", None), router_path=f"{path}.{router_name}",
                   family=getattr(getattr(model, "config", None), "model_type", None))

    @classmethod
    def is_moe_block(cls, block: nn.Module) -> bool:
        """Whether a decoder layer's FFN child is a sparse MoE block (dense MLPs have no experts)."""
        return hasattr(block, "experts")

    def check(self) -> None:
        """Validate that the block matches what this adapter expects (raise UnsupportedFamily)."""

    # -- identity ---------------------------------------------------------
    @property
    def has_shared_experts(self) -> bool:
        return self.shared_experts is not None

    @property
    def is_softmax(self) -> bool:
        return self.score_kind == "softmax"

    @property
    def experts_path(self) -> str:
        return f"{self.path}.experts"

    @property
    def shared_experts_path(self) -> str | None:
        if self.shared_experts is None:
            return None
        for name in self.shared_names:
            if getattr(self.block, name, None) is self.shared_experts:
                return f"{self.path}.{name}"
        return None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, layer={self.layer_idx}, path={self.path!r}, "
                f"experts={self.num_experts}, top_k={self.top_k}, shared={self.has_shared_experts})")

    def param_name(self, param: nn.Parameter) -> str:
        return self._names[id(param)]

    # -- routing ----------------------------------------------------------
    def unpack_router_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router module's forward output -> (logits [T, E], top-K weights [T, K], top-K indices [T, K]).

        transformers routers return that triple; adapters of routers that return less
        (DBRX: logits only) complete it with `route_from_logits`."""
        return output[0], output[1], output[2]

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] (or [B, S, H]) block-input hidden states -> [T, E] router logits, as the router computes them."""
        return self.unpack_router_output(self.router(hidden.reshape(-1, hidden.shape[-1])))[0]

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] router logits -> [T, E] fp32 full score distribution (before top-K)."""
        return torch.softmax(logits.float(), dim=-1)

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        """Top-K selection and gate weights from router logits, exactly as the model does it in eval mode."""
        raise NotImplementedError

    def route(self, hidden: torch.Tensor) -> Routing:
        """Route block-input hidden states [T, H] (or [B, S, H])."""
        return self.route_from_logits(self.router_logits(hidden))

    def router_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters of this layer's router (weight, and bias where present; never
        buffers such as DeepSeek-V3's e_score_correction_bias)."""
        named = [(self.param_name(p), p) for p in self.router.parameters()]
        return [(n, p) for n, p in named if not n.endswith("e_score_correction_bias")]  # ERNIE keeps it as a Parameter

    def router_num_params(self) -> int:
        return sum(p.numel() for _, p in self.router_parameters())

    # -- shared experts ---------------------------------------------------
    def shared_expert_modules(self) -> list[nn.Module]:
        """The always-on experts of this block and their gate (if any); empty when there are none."""
        return [m for m in (self.shared_experts, self.shared_expert_gate) if m is not None]

    def shared_expert_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(self.param_name(p), p) for m in self.shared_expert_modules() for p in m.parameters()]

    def shared_expert_num_params(self) -> int:
        return sum(p.numel() for _, p in self.shared_expert_parameters())

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """[N, H] -> [N, H]: what the shared experts add to the block output (gated by
        sigmoid(shared_expert_gate) where the family has that gate); None without shared experts."""
        if self.shared_experts is None:
            return None
        out = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    # -- block ------------------------------------------------------------
    def block_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the whole block on [B, S, H] hidden states; returns [B, S, H] (some blocks
        return a tuple, e.g. GPT-OSS's (output, router scores): the output is taken)."""
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out

    # -- expert weights ---------------------------------------------------
    def expert_slices(self, expert: int) -> list[ExpertSlice]:
        """Which slices of which parameters hold routed expert `expert`."""
        raise NotImplementedError

    def _expert_views(self, expert: int) -> dict[str, torch.Tensor]:
        """Views of expert `expert` in nn.Linear orientation (see `get_expert`)."""
        raise NotImplementedError

    def check_expert(self, expert: int) -> None:
        if not 0 <= int(expert) < self.num_experts:
            raise BadInputError(
                f"expert {expert} out of range for layer {self.layer_idx}: it has {self.num_experts} routed "
                f"experts (0..{self.num_experts - 1})")

    def get_expert(self, expert: int) -> dict[str, torch.Tensor]:
        """Views (no copies) of expert `expert`'s weights, the same in every family:
        "gate" [I, H], "up" [I, H], "down" [H, I] (nn.Linear orientation: out x in), and
        "gate_bias" [I], "up_bias" [I], "down_bias" [H] where the family has biases.
        Views may be transposed or strided; writing into them writes the model."""
        self.check_expert(expert)
        return self._expert_views(int(expert))

    @torch.no_grad()
    def set_expert(self, expert: int, weights: dict[str, torch.Tensor]) -> None:
        """Write new weights into expert `expert` in place; keys are roles of `get_expert`
        (all shapes are checked before anything is written)."""
        views = self.get_expert(expert)
        unknown = set(weights) - set(views)
        if unknown:
            raise BadInputError(f"unknown expert weight roles {sorted(unknown)}; this layer has {sorted(views)}")
        for role, value in weights.items():
            if tuple(value.shape) != tuple(views[role].shape):
                raise BadInputError(f"{role}: expected shape {tuple(views[role].shape)}, got {tuple(value.shape)}")
        for role, value in weights.items():
            views[role].copy_(value)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, H]: routed expert `expert` applied to x, before its routing weight."""
        w = self.get_expert(expert)
        h = self.activation(nn.functional.linear(x, w["gate"], w.get("gate_bias")),
                             nn.functional.linear(x, w["up"], w.get("up_bias")))
        return nn.functional.linear(h, w["down"], w.get("down_bias"))

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The expert's intermediate activation from its gate and up projections (the down projection's input)."""
        return self.experts.act_fn(gate) * up

    def expert_num_params(self) -> int:
        """Parameter count of one routed expert."""
        return sum(s.numel for s in self.expert_slices(0))
