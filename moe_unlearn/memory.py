"""Per-rank memory of an unlearning run, computed from the model's config without loading weights.

`moe-unlearn unlearn --plan --model DIR [--shard fsdp2 --nproc N] [--target L:E]` builds the model on
the meta device (shapes only, no memory) and counts, per rank:
  weights         the parameters the rank stores: its FSDP2 share of every unit (dim 0 split in
                  `world` parts, rounded up as FSDP2 pads) plus the parameters holding a trained
                  tensor, kept whole; without sharding, the whole model
  gathered units  FSDP2 gathers one unit (a decoder layer, the embedding, the lm_head) whole while it
                  runs and prefetches the next: twice the largest unit's gathered bytes (0 unsharded)
  trained leaves  the leaves the optimizer trains (fp32 shadows of the target experts' slices, fp32
                  masters of a low-precision router) and their gradients
  fused gradient  the full-size gradient autograd materialises for each fused expert tensor holding a
                  trained slice (and the router's), before the hook keeps the slice
  optimizer       AdamW's two moments of the trained leaves
Activations (and the prefix cache) are not counted: they depend on the batch, not the model. These
are computed numbers, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError

GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of each part of a run (see the module docstring); `total` is their sum."""

    model_type: str
    world_size: int
    shard: str | None
    dtype: str
    targets: tuple[str, ...]
    total_params: int
    weights: int
    trained_block: int
    gathered: int
    trained_leaves: int
    fused_gradient: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gathered + self.trained_leaves + self.fused_gradient + self.optimizer

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def report(self) -> str:
        how = f"FSDP2 over {self.world_size} ranks" if self.shard else f"a whole copy on each of {self.world_size} ranks"
        rows = [("weights (share + trained block)" if self.shard else "weights", self.weights),
                ("  of which the trained block, whole", self.trained_block),
                ("gathered units (running + prefetched)", self.gathered),
                ("trained leaves + their gradients", self.trained_leaves),
                ("fused expert gradient (full size)", self.fused_gradient),
                ("optimizer state (AdamW)", self.optimizer)]
        lines = [f"{self.model_type}: {self.total_params / 1e9:.2f}B parameters in {self.dtype}, targets "
                 f"{', '.join(self.targets)}; {how}",
                 *(f"  {name:<40} {val / GB:9.2f} GB" for name, val in rows),
                 f"  {'total per rank (activations not counted)':<40} {self.total / GB:9.2f} GB",
                 "computed from the config (no weights loaded), not measured"]
        return "\n".join(lines)


def meta_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of `config` on the meta device (shapes and dtypes, no memory)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _share(p: torch.Tensor, world_size: int) -> int:
    """Bytes of the largest FSDP2 shard of `p` (dim 0 split, rounded up)."""
    if p.dim() == 0:
        return p.element_size()
    return math.ceil(p.shape[0] / world_size) * (p.numel() // max(p.shape[0], 1)) * p.element_size()


def estimate(model: nn.Module, targets: list[tuple[int, int]] | None = None, *, world_size: int = 1,
             shard: str | None = None) -> MemoryPlan:
    """The per-rank memory of a uoe / topm run on `targets` [(layer, expert)] (default: expert 0 of the
    first MoE layer) of `model` (a meta-device model from `meta_model`, or a real one)."""
    from moe_unlearn.arch import find_moe_layers
    from moe_unlearn.sharding import shard_units
    from moe_unlearn.unlearning.scopes import master_dtype

    layers = {m.layer_idx: m for m in find_moe_layers(model)}
    if not layers:
        raise BadInputError(f"{type(model).__name__} has no MoE layer")
    targets = targets or [(min(layers), 0)]
    slices, routers = [], {}
    for layer_idx, expert in targets:
        layer = layers.get(layer_idx)
        if layer is None:
            raise BadInputError(f"target {layer_idx}:{expert}: layer {layer_idx} is not an MoE layer ({sorted(layers)})")
        layer.check_expert(expert)
        slices += layer.expert_slices(expert)
        routers.update({id(p): p for _, p in layer.router_parameters()})
    keep = {id(s.param): s.param for s in slices} | routers  # the parameters kept whole (trained tensors)
    params = list({id(p): p for p in model.parameters()}.values())
    total_params = sum(p.numel() for p in params)
    block = sum(_nbytes(p) for p in keep.values())
    if shard:
        weights = sum(_nbytes(p) if id(p) in keep else _share(p, world_size) for p in params)
        unit_layers, edges = shard_units(model)
        gathered = max(sum(_nbytes(p) for p in u.parameters() if id(p) not in keep) for u in [*unit_layers, *edges])
        gathered *= 2
    else:
        weights, gathered = sum(_nbytes(p) for p in params), 0
    leaf_bytes = sum(s.numel * torch.empty((), dtype=master_dtype(s.param.dtype)).element_size() for s in slices)
    leaf_bytes += sum(p.numel() * 4 for p in routers.values() if master_dtype(p.dtype) != p.dtype)
    in_place = sum(_nbytes(p) for p in routers.values() if master_dtype(p.dtype) == p.dtype)
    fused = sum(_nbytes(p) for p in {id(s.param): s.param for s in slices}.values()) + sum(
        _nbytes(p) for p in routers.values())
    # leaves + their gradients (an fp32 router trains in place: its gradient is the fused one's);
    # AdamW keeps two moments of every leaf
    dtype = str(next(iter(keep.values())).dtype).replace("torch.", "")
    return MemoryPlan(model_type=getattr(getattr(model, "config", None), "model_type", type(model).__name__),
                      world_size=world_size, shard=shard, dtype=dtype,
                      targets=tuple(f"{ly}:{e}" for ly, e in targets), total_params=total_params, weights=weights,
                      trained_block=block, gathered=gathered, trained_leaves=2 * leaf_bytes,
                      fused_gradient=fused, optimizer=2 * (leaf_bytes + in_place))


__all__ = ["MemoryPlan", "estimate", "meta_model"]
