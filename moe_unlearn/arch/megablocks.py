"""Optional megablocks support: `MoE` / `dMoE` blocks of databricks/megablocks, read without importing it.

megablocks is never imported here: 0.10 does not import without its CUDA extension
(`megablocks_ops`), which does not build with nvcc 13 against torch 2.7+. A block is recognised structurally: some class in
`type(module).__mro__` is named `MoE` or `dMoE` and lives in a module under `megablocks.`.
`find_moe_layers` falls back to this adapter when a model's `config.model_type` is no
transformers MoE family and the model contains such blocks (a custom model built from
megablocks layers).

What megablocks does, as read in the databricks/megablocks sources (the indexed tree carries
`megablocks/_version.py` = 0.9.0, the last version whose source was readable here; 0.10 is assumed to be
the same in everything below, which only a run against the installed package can confirm):

megablocks/layers/moe.py
  `MoE(args)`: attributes `router` (LearnedRouter), `experts` (`ParallelMLP`, built by
  `_init_experts_mlp`), `shared_expert` (None, or SharedMLP / SharedGLU when
  `args.shared_expert`). MoE keeps no `args` of its own. `forward(x)`:
  `x = common.cast_if_autocast_enabled(x)`; `scores, expert_weights, top_experts = self.router(x)`;
  `out = self.experts(x, scores, expert_weights, top_experts)`; with a shared expert
  `out = shared_expert.add_experts_sharedexpert(shared_expert(x), out)`.
  `ParallelMLP`: `num_experts`, `top_k`, `mlp` (= `mlp.MLP(args)`), `bias` (Parameter [H] when
  `args.bias`, else None; "not parallelized with expert model parallelism"). Its forward
  returns `(out, bias)` when `args.return_bias` (the default, Megatron style: the caller adds
  the bias), else `out + bias`, or `out` without bias. The plain MoE has an expert capacity
  `int(moe_capacity_factor * top_k * tokens * world_size / num_experts)` and drops tokens
  beyond it (0 = no dropping).
megablocks/layers/dmoe.py
  `dMoE(moe.MoE)` only overrides `_init_experts_mlp` -> `ParallelDroplessMLP(moe.ParallelMLP)`,
  whose `mlp = dmlp_registry.get(args)`: (mlp_type, mlp_impl) in {mlp, glu} x {sparse,
  grouped} -> SparseMLP, GroupedMLP (megablocks/layers/mlp.py), SparseGLU, GroupedGLU
  (megablocks/layers/glu.py). Dropless: every routed token is computed. The output is
  `sum_k expert_weights[t, k] * mlp_{top_experts[t, k]}(x_t)` (padded_scatter / scatter with the
  weights, top_k contributions summed).
megablocks/layers/router.py
  `LearnedRouter`: `layer = nn.Linear(hidden_size, moe_num_experts, bias=False)` (not
  sharded: every rank holds the whole router). forward(x): in training with
  `moe_jitter_eps`, `x = x * U(1 - eps, 1 + eps)` (before the linear); `logits =
  layer(x.view(-1, H))`; `scores = logits.softmax(dim=-1)` (in the logits' dtype);
  top-K: `scores.max(dim=-1, keepdim=True)` when `moe_top_k == 1`, else `torch.topk(scores,
  moe_top_k, dim=-1)`; if `moe_normalize_expert_weights` (a p, None by default) the weights
  are divided by `torch.norm(weights, p=p, dim=-1, keepdim=True)`; with the benchmarking flag
  `uniform_expert_assignment` the indices become `arange(numel) % num_experts`. Returns
  `(scores [T, E], expert_weights [T, K], expert_indices [T, K])`: softmax scores, not logits.
megablocks/layers/mlp.py
  `MLP` (plain MoE): `w1` [E_rank, H, I_rank], `w2` [E_rank, I_rank, H];
  `bmm(act(bmm(x, w1)), w2)`: no GLU, w1 is stored transposed relative to nn.Linear.
  `SparseMLP` / `GroupedMLP` (dMoE): `w1`, `w2` both 2-D [E_rank * I_rank, H] (rows of expert e
  = [e*I, (e+1)*I)); `act(x @ w1_e.T) @ w2_e`. Initialised from a master [E, I, H] tensor
  viewed as [E*I, H].
megablocks/layers/glu.py
  `SparseGLU` / `GroupedGLU` (dMoE, mlp_type="glu"): adds `v1` [E_rank * I_rank, H];
  `(act(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e` (GroupedGLU views each as [E, I, H]).
megablocks/layers/arguments.py
  `activation_fn` defaults to `partial(F.gelu, approximate='tanh')`; `bias=True`,
  `return_bias=True`, `moe_top_k=1`, `moe_capacity_factor=1`, `mlp_type='mlp'`,
  `mlp_impl='sparse'`, `shared_expert_weighted_sum=False`, `moe_expert_model_parallelism=False`.
megablocks/layers/mpu.py
  With expert model parallelism a rank holds `experts_per_rank = E / expert_sharding_degree`
  experts and `features_per_rank = I / hidden_sharding_degree` rows of each: this adapter
  reads unsharded blocks only and refuses sharded ones.

Design: the adapter's router is `block.router.layer` (the nn.Linear), not the LearnedRouter.
Its output is the logits exactly as used for routing (after jitter in training), which the
rest of the library needs (anchors, routing_stats and attribution apply `scores_from_logits`
to them); the LearnedRouter itself returns only softmax probabilities. The top-K weights and
indices are recomputed from those logits with megablocks' own operations, as DbrxLayer does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.base import ExpertSlice, MoELayer, Routing
from moe_unlearn.errors import UnsupportedFamily

_BLOCK_CLASSES = ("MoE", "dMoE")


def is_megablocks_block(module: nn.Module) -> bool:
    """Whether `module` is a megablocks MoE / dMoE block (or a subclass of one), by class name
    and module path only (megablocks is not imported)."""
    return any(c.__name__ in _BLOCK_CLASSES and c.__module__.startswith("megablocks.")
               for c in type(module).__mro__)


def has_megablocks_blocks(model: nn.Module) -> bool:
    return any(is_megablocks_block(m) for m in model.modules())


def _layer_index(path: str) -> int | None:
    """The index of the last ModuleList entry on a module path ('model.layers.3.ffn' -> 3)."""
    numbers = [p for p in path.split(".") if p.isdigit()]
    return int(numbers[-1]) if numbers else None


class MegablocksLayer(MoELayer):
    """A megablocks `MoE` or `dMoE` block.

    Routing: softmax in the logits' dtype over all experts, top-K (max for K = 1), weights
    divided by their p-norm when `moe_normalize_expert_weights` is set. Experts: GLU (w1 =
    gate, v1 = up, w2 = down) or plain MLP (w1 = up, w2 = down), activation
    `args.activation_fn`. An expert is the row block [e*I, (e+1)*I) of each 2-D weight (dMoE)
    or index e of the 3-D weights (plain MoE). The output bias `experts.bias` is shared by all
    experts (no expert slice holds it); `block_output` adds it when the block returns it apart.
    """

    family = "megablocks"
    routing_rule = "softmax-topk-pnorm"
    decoder_layer_lists = ("layers", "blocks", "h", "layer")

    @classmethod
    def is_moe_block(cls, block: nn.Module) -> bool:
        return is_megablocks_block(block)

    @classmethod
    def from_block(cls, *, model: nn.Module, layer_idx: int, path: str, block: nn.Module) -> MoELayer:
        router = getattr(getattr(block, "router", None), "layer", None)
        experts = getattr(block, "experts", None)
        args = getattr(getattr(block, "router", None), "args", None)
        if not isinstance(router, nn.Linear) or experts is None or getattr(experts, "mlp", None) is None or args is None:
            raise UnsupportedFamily(f"{path}: expected a megablocks block with router.layer (nn.Linear), router.args "
                                    "and experts.mlp (the megablocks >= 0.5 layout)")
        return cls(model=model, layer_idx=layer_idx, path=path, block=block, router=router, experts=experts,
                   num_experts=int(args.moe_num_experts), top_k=int(args.moe_top_k),
                   shared_experts=getattr(block, "shared_expert", None), router_path=f"{path}.router.layer")

    @classmethod
    def find_layers(cls, model: nn.Module) -> list[MoELayer]:
        """Every megablocks block of `model` in module order. layer_idx is the block's index in
        its enclosing ModuleList ('layers.3.ffn' -> 3), or its position among the blocks when
        blocks have no such index or share one."""
        found = [(path, m) for path, m in model.named_modules() if is_megablocks_block(m)]
        indices = [_layer_index(path) for path, _ in found]
        if None in indices or len(set(indices)) != len(indices):
            indices = list(range(len(found)))
        return [cls.from_block(model=model, layer_idx=int(i), path=path, block=m)
                for i, (path, m) in zip(indices, found, strict=True)]

    @property
    def args(self) -> Any:
        return self.block.router.args

    @property
    def mlp(self) -> nn.Module:
        return self.experts.mlp

    @property
    def is_glu(self) -> bool:
        return getattr(self.mlp, "v1", None) is not None

    @property
    def is_3d(self) -> bool:
        """Plain MoE's `mlp.MLP`: w1 [E, H, I], w2 [E, I, H]."""
        return self.mlp.w1.dim() == 3

    @property
    def drops_tokens(self) -> bool:
        """The plain MoE drops tokens beyond its expert capacity (then the block output is not
        the weighted sum of the routed experts for those tokens; routing itself is unaffected)."""
        return not any(c.__name__ == "dMoE" for c in type(self.block).__mro__) and \
            float(getattr(self.args, "moe_capacity_factor", 0) or 0) > 0

    @property
    def _inter(self) -> int:
        return int(self.args.ffn_hidden_size)

    def check(self) -> None:
        a = self.args
        if getattr(a, "moe_expert_model_parallelism", False):
            raise UnsupportedFamily(f"{self.path}: expert model parallelism shards the experts over ranks; this "
                                    "adapter reads unsharded megablocks blocks only")
        if getattr(a, "shared_expert", False) and getattr(a, "shared_expert_weighted_sum", False):
            raise UnsupportedFamily(f"{self.path}: shared_expert_weighted_sum rescales the routed experts by "
                                    "K/(K+1), which the MoELayer interface does not model")
        mlp = self.mlp
        names = ("w1", "v1", "w2") if self.is_glu else ("w1", "w2")
        e, h, i = self.num_experts, int(a.hidden_size), self._inter
        want = {"w1": (e, h, i), "w2": (e, i, h)} if self.is_3d else {n: (e * i, h) for n in names}
        for n in names:
            p = getattr(mlp, n, None)
            if not isinstance(p, nn.Parameter) or tuple(p.shape) != want[n]:
                got = None if p is None else tuple(p.shape)
                raise UnsupportedFamily(f"{self.path}.experts.mlp.{n}: expected shape {want[n]} (all {e} experts, "
                                        f"ffn_hidden_size {i}, unsharded), got {got}")
        if self.is_3d and self.is_glu:
            raise UnsupportedFamily(f"{self.path}.experts.mlp: a 3-D GLU layout is not a megablocks layout")

    # -- routing ----------------------------------------------------------
    def unpack_router_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        routing = self.route_from_logits(output)
        return output, routing.topk_weight.to(output.dtype), routing.topk_idx

    def route_from_logits(self, logits: torch.Tensor) -> Routing:
        a = self.args
        logits2 = logits.reshape(-1, logits.shape[-1])
        probs = logits2.softmax(dim=-1)
        if self.top_k == 1:
            weight, idx = probs.max(dim=-1, keepdim=True)
        else:
            weight, idx = torch.topk(probs, self.top_k, dim=-1)
        p = getattr(a, "moe_normalize_expert_weights", None)
        if p:
            weight = weight / torch.norm(weight, p=p, dim=-1, keepdim=True)
        if getattr(a, "uniform_expert_assignment", False):
            idx = torch.remainder(torch.arange(idx.numel(), dtype=idx.dtype, device=idx.device),
                                  self.num_experts).view(idx.shape)
        return Routing(scores=torch.softmax(logits2.float(), dim=-1), topk_idx=idx, topk_weight=weight.float())

    # -- block ------------------------------------------------------------
    def block_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output with its output bias added (megablocks returns `(out, bias)` when
        `args.return_bias`, leaving the addition to the caller)."""
        out = self.block(hidden)
        if isinstance(out, tuple):
            out, bias = out[0], (out[1] if len(out) > 1 else None)
            if bias is not None:
                out = out + bias
        return out

    # -- expert weights ---------------------------------------------------
    def _roles(self) -> tuple[tuple[str, str], ...]:
        return (("w1", "gate"), ("v1", "up"), ("w2", "down")) if self.is_glu else (("w1", "up"), ("w2", "down"))

    def expert_slices(self, expert: int) -> list[ExpertSlice]:
        self.check_expert(expert)
        e = int(expert)
        start, stop = (e, e + 1) if self.is_3d else (e * self._inter, (e + 1) * self._inter)
        return [ExpertSlice(self.param_name(getattr(self.mlp, attr)), getattr(self.mlp, attr), 0, start, stop, role)
                for attr, role in self._roles()]

    def _expert_views(self, expert: int) -> dict[str, torch.Tensor]:
        mlp = self.mlp
        if self.is_3d:  # w1[e]: [H, I] (x @ w1), w2[e]: [I, H] (h @ w2)
            return {"up": mlp.w1.data[expert].T, "down": mlp.w2.data[expert].T}
        start, n = expert * self._inter, self._inter
        views = {role: getattr(mlp, attr).data.narrow(0, start, n) for attr, role in self._roles()}
        views["down"] = views["down"].T  # w2 rows are [I, H]: h @ w2_e
        return views

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        w = self.get_expert(expert)
        up = nn.functional.linear(x, w["up"])
        h = self.args.activation_fn(nn.functional.linear(x, w["gate"])) * up if "gate" in w else \
            self.args.activation_fn(up)
        return nn.functional.linear(h, w["down"])

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.args.activation_fn(gate) * up
