"""Stage 5, params: what the optimizer trains for a plan, and the input statistics an adapter patch stores.

Without an adapter: `SliceParams` (fp32 shadows of the expert slices, masters of whole tensors).
With one: `AdapterParams` (factors B, A of every expert matrix, and of the routers with
adapter_router; the rest in full), and per trained matrix the Gram factors of its inputs on the
forget and retain data, which `fuse_patches` merges requests with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.base import ExpertSlice
from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.unlearning.adapters import AdapterParams, gram_factor, router_layout, slice_layout
from moe_unlearn.unlearning.batches import Batches
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.plan import Plan
from moe_unlearn.unlearning.scopes import SliceParams
from moe_unlearn.unlearning.tensor import Key, TrainedTensor


def trainable_params(plan: Plan, cfg: UnlearnConfig, model: nn.Module) -> SliceParams | AdapterParams:
    """The leaves (and hooks) that train the plan's tensors."""
    scope = plan.scope
    if cfg.adapter is None:
        return SliceParams(scope.slices, scope.whole)
    by_idx, owners = plan.by_idx, _owners(plan)
    matrices, rest_slices, rest_whole = [], [], []
    for sl in scope.slices:
        tensor = owners[_key(sl)]
        layout = slice_layout(by_idx[tensor.owner[0]], sl, tensor.owner[1])
        if layout is None:
            rest_slices.append(sl)
        else:
            matrices.append((tensor, sl.param, layout))
    router_names = {n for i in scope.router_layers for n, _ in by_idx[i].router_parameters()}
    hidden = model.config.hidden_size
    for n, p in scope.whole:
        layout = router_layout(p, hidden) if cfg.adapter_router and n in router_names else None
        if layout is None:
            rest_whole.append((n, p))
        else:
            matrices.append((TrainedTensor(n), p, layout))
    return AdapterParams(matrices, rest_slices, rest_whole, rank=cfg.adapter_rank, seed=cfg.seed)


def lowrank_parts(trained: Any, plan: Plan) -> dict[int, dict[str, Any]]:
    """write_patch's lowrank=: {entry index: factors} of the tensors an adapter trained (empty otherwise)."""
    factors = trained.factors() if isinstance(trained, AdapterParams) else {}
    return {i: factors[t.key] for i, t in enumerate(plan.tensors) if t.key in factors}


def _key(sl: ExpertSlice) -> Key:
    return TrainedTensor.of_slice(sl).key


def _owners(plan: Plan) -> dict[Key, TrainedTensor]:
    return {t.key: t for t in plan.tensors}


def _gram_key(plan: Plan, tensor: TrainedTensor) -> str | None:
    """Which input Gram a tensor's matrix reads (see moe_unlearn.unlearning.projection.input_grams)."""
    if tensor.dim is not None:
        if tensor.owner is None or tensor.role not in ("gate_up", "gate", "up", "down"):
            return None
        return f"{'a' if tensor.role == 'down' else 'x'}/{tensor.owner[0]}/{tensor.owner[1]}"
    by_idx = plan.by_idx
    for i in plan.scope.router_layers:
        for n, p in by_idx[i].router_parameters():
            if n == tensor.name and p.dim() == 2:
                return f"router/{i}"
    return None


def adapter_grams(plan: Plan, batches: Batches, model: nn.Module, *, rank: int,
                  device: torch.device) -> dict[int, dict[str, Any]]:
    """Per trained matrix, factors of the Gram matrices of its inputs on the forget and the retain
    data (original model), stored with an adapter patch so that fuse_patches needs no data."""
    from moe_unlearn.unlearning.projection import input_grams

    by_idx = plan.by_idx
    keys = {i: _gram_key(plan, t) for i, t in enumerate(plan.tensors)}
    keys = {i: k for i, k in keys.items() if k is not None}
    experts = sorted({tuple(int(x) for x in k.split("/")[1:]) for k in keys.values() if not k.startswith("router")})
    routers = sorted({int(k.split("/")[1]) for k in keys.values() if k.startswith("router")})
    kw = dict(router_layers=[by_idx[i] for i in routers], experts=[(by_idx[i], e) for i, e in experts],
              device=device)
    stats = {"forget": input_grams(model, batches.forget, **kw), "retain": input_grams(model, batches.retain or [], **kw)}
    params = canonical_parameters(model)
    slices = {_key(sl): sl for sl in plan.scope.slices}
    out = {}
    for i, key in keys.items():
        in_features = _in_features(plan, plan.tensors[i], params, slices, model.config.hidden_size)
        rec: dict[str, Any] = {}
        for kind, g in stats.items():
            gram = g.sums.get(key, torch.zeros(in_features, in_features, dtype=torch.float64))
            rec[kind], rec[f"{kind}_energy"] = gram_factor(gram, rank)
            rec[f"{kind}_tokens"] = g.counts.get(key, 0)
        out[i] = rec
    return out


def _in_features(plan: Plan, tensor: TrainedTensor, params: dict[str, nn.Parameter],
                 slices: dict[Key, ExpertSlice], hidden: int) -> int:
    if tensor.dim is None:
        return router_layout(params[tensor.name], hidden).matrix(params[tensor.name]).shape[1]
    sl = slices[tensor.key]
    layer, expert = tensor.owner
    return slice_layout(plan.by_idx[layer], sl, expert).matrix(sl.view()).shape[1]


__all__ = ["adapter_grams", "lowrank_parts", "trainable_params"]
