"""Scopes: which parameters (or slices of fused expert tensors) an unlearning run trains.

Experts are fused into 3-D tensors (`gate_up_proj [E, 2I, H]`), so "train expert e" cannot be
done with requires_grad on a sub-module. A one-expert scope trains small *shadow* leaf
tensors, one per expert slice: after each backward a gradient hook moves the fused tensor's
gradient slice into the shadow (and drops the fused gradient), the optimizer updates only
the shadows (optimizer state proportional to one expert), and after each step the shadow
is written back into the slice. Every other slice stays bit-identical. For a bf16/fp16 model
the shadows (and masters of trained whole tensors) are fp32, so small updates are not lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_unlearn.arch.base import ExpertSlice, MoELayer
from moe_unlearn.arch.target import ExpertTarget
from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.errors import BadInputError
from moe_unlearn.registry import Registry
from moe_unlearn.training import TrainHooks


@dataclass
class ScopePlan:
    """The outcome of resolving a scope on a model.

    whole: parameters trained entirely (name, param). slices: expert slices trained through
    shadows. router_layers: MoE layers whose router trains. targets: the experts unlearned
    (uoe / topm), used by the router anchor.
    """

    name: str
    whole: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    slices: list[ExpertSlice] = field(default_factory=list)
    router_layers: list[int] = field(default_factory=list)
    targets: list[ExpertTarget] = field(default_factory=list)

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.whole) + sum(s.numel for s in self.slices)


@dataclass(frozen=True)
class Scope:
    """A registered scope: how it resolves into trained tensors and what it allows.

    reads_targets: it trains given (or attributed) experts, reads `target` and anchors their routers.
    max_targets: how many targets it takes (None: any number). picks_several: it chooses its
    targets by top_m / coverage from an attribution. adapters: an adapter can hold its expert
    matrices. split_experts: under an adapter, its fused expert tensors train as per-expert slices.
    """

    name: str
    resolve: Callable[[ScopePlan, nn.Module, list[MoELayer], list[ExpertTarget], bool], None]
    reads_targets: bool = False
    max_targets: int | None = None
    picks_several: bool = False
    adapters: bool = False
    split_experts: bool = False
    help: str = ""


def _layer_map(layers: list[MoELayer]) -> dict[int, MoELayer]:
    return {layer.layer_idx: layer for layer in layers}


def _check_target(t: ExpertTarget, by_idx: dict[int, MoELayer], allow_shared: bool) -> MoELayer:
    layer = by_idx.get(t.layer)
    if layer is None:
        raise BadInputError(f"target {t}: layer {t.layer} is not an MoE layer; MoE layers: {sorted(by_idx)}")
    if t.shared:
        if not layer.has_shared_experts:
            raise BadInputError(f"target {t}: layer {t.layer} has no shared expert")
        if not allow_shared:
            raise BadInputError(f"target {t} is a shared expert (used by every token); unlearning it hurts "
                                "utility. Pass allow_shared=True (CLI: --allow-shared) if you mean it")
    else:
        layer.check_expert(int(t.expert))
    return layer


def _full(plan: ScopePlan, model: nn.Module, layers: list[MoELayer], targets: list[ExpertTarget],
          allow_shared: bool) -> None:
    plan.whole = list(canonical_parameters(model).items())  # base weights only (no PEFT adapters)
    plan.router_layers = sorted(_layer_map(layers))


def _all_but_routers(plan: ScopePlan, model: nn.Module, layers: list[MoELayer], targets: list[ExpertTarget],
                     allow_shared: bool) -> None:
    routers = {n for layer in layers for n, _ in layer.router_parameters()}
    plan.whole = [(n, p) for n, p in canonical_parameters(model).items() if n not in routers]


def _experts(plan: ScopePlan, model: nn.Module, layers: list[MoELayer], targets: list[ExpertTarget],
             allow_shared: bool) -> None:
    for layer in layers:
        plan.whole += [(layer.param_name(p), p) for p in layer.experts.parameters()]


def _routers(plan: ScopePlan, model: nn.Module, layers: list[MoELayer], targets: list[ExpertTarget],
             allow_shared: bool) -> None:
    for layer in layers:
        plan.whole += layer.router_parameters()
    plan.router_layers = sorted(_layer_map(layers))


def _targeted(plan: ScopePlan, model: nn.Module, layers: list[MoELayer], targets: list[ExpertTarget],
              allow_shared: bool) -> None:
    """The target experts' slices (or a shared expert's modules) and their layers' routers."""
    by_idx = _layer_map(layers)
    seen_routers: set[int] = set()
    for t in targets:
        layer = _check_target(t, by_idx, allow_shared)
        if t.shared:
            mods = [layer.shared_experts] + ([layer.shared_expert_gate] if layer.shared_expert_gate else [])
            for mod in mods:
                plan.whole += [(layer.param_name(p), p) for p in mod.parameters()]
        else:
            plan.slices += layer.expert_slices(int(t.expert))
        if t.layer not in seen_routers:
            seen_routers.add(t.layer)
            plan.whole += layer.router_parameters()
    plan.router_layers = sorted(seen_routers)
    plan.targets = list(targets)


SCOPES: Registry[Scope] = Registry("scope")
SCOPES.register("full", Scope("full", _full, help="every base weight"))
SCOPES.register("all_but_routers", Scope("all_but_routers", _all_but_routers,
                                         help="every base weight except the routers"))
SCOPES.register("experts", Scope("experts", _experts, adapters=True, split_experts=True,
                                 help="every expert of every MoE layer"))
SCOPES.register("routers", Scope("routers", _routers, help="every router"))
SCOPES.register("uoe", Scope("uoe", _targeted, reads_targets=True, max_targets=1, adapters=True,
                             help="one target expert and its router (UOE)"))
SCOPES.register("topm", Scope("topm", _targeted, reads_targets=True, picks_several=True, adapters=True,
                              help="several target experts and their routers"))


def resolve_scope(model: nn.Module, layers: list[MoELayer], scope: str, targets: list[ExpertTarget], *,
                  allow_shared: bool = False) -> ScopePlan:
    """Which weights train for `scope`; `targets` are needed (and checked) for uoe / topm."""
    entry = SCOPES.lookup(scope)
    plan = ScopePlan(scope)
    if entry.reads_targets:
        if not targets:
            raise BadInputError(f"scope {scope!r} needs a target expert (LAYER:EXPERT) or an attribution")
        if entry.max_targets is not None and len(targets) > entry.max_targets:
            raise BadInputError(f"scope {scope!r} trains exactly one expert, got {len(targets)} targets; "
                                "use scope 'topm' for several")
        if len(set(targets)) != len(targets):
            raise BadInputError(f"duplicate targets in {[str(t) for t in targets]}")
    entry.resolve(plan, model, layers, targets, allow_shared)
    return plan


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a trained copy of a `dtype` tensor is kept in: fp32 for bf16/fp16, else `dtype`.

    A bf16 weight near 0.02 moves only in steps of about 1e-4 (8 mantissa bits), so an update
    of lr 1e-5 rounds back to the same value every step; an fp32 master accumulates it."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def accumulate_grad(leaf: torch.Tensor, g: torch.Tensor) -> None:
    """Add `g` to `leaf.grad` in the leaf's dtype (micro-batches accumulate; the first one sets it)."""
    if leaf.grad is None:
        leaf.grad = g.detach().to(leaf.dtype, copy=True)
    else:
        leaf.grad.add_(g.to(leaf.dtype))


class SliceParams(TrainHooks):
    """The leaves the optimizer trains for a scope; pass `.leaves` to `train` and this object as a hook.

    - each expert slice gets a shadow leaf (`.shadows`), of the slice's size only;
    - each trained whole tensor in bf16/fp16 gets an fp32 master leaf; whole tensors already in
      fp32 train in place (no copy).
    Shadows and masters are fp32 for a low-precision model (`master_dtype`), so updates below the
    model dtype's resolution accumulate; after each step they are written back into the model,
    rounded to its dtype. Gradient hooks move the model tensor's gradient into the leaf (cast to
    fp32, accumulated there across micro-batches) and drop it. Call `close()` when done.
    """

    def __init__(self, slices: list[ExpertSlice], whole: list[tuple[str, nn.Parameter]] | None = None) -> None:
        self.slices = list(slices)
        self.shadows = [nn.Parameter(s.view().detach().to(master_dtype(s.param.dtype), copy=True))
                        for s in self.slices]
        self._handles = []
        by_param: dict[int, list[int]] = {}
        for i, s in enumerate(self.slices):
            by_param.setdefault(id(s.param), []).append(i)
        for idxs in by_param.values():
            param = self.slices[idxs[0]].param
            param.requires_grad_(True)
            self._handles.append(param.register_post_accumulate_grad_hook(self._slice_hook(idxs)))
        self.masters: list[tuple[nn.Parameter, nn.Parameter]] = []  # (model tensor, fp32 master)
        in_place: list[nn.Parameter] = []
        for _, p in whole or []:
            p.requires_grad_(True)
            if p.dtype in _LOW_PRECISION:
                master = nn.Parameter(p.detach().to(torch.float32, copy=True))
                self.masters.append((p, master))
                self._handles.append(p.register_post_accumulate_grad_hook(self._master_hook(master)))
            else:
                in_place.append(p)
        self.leaves: list[nn.Parameter] = in_place + [m for _, m in self.masters] + self.shadows

    def _slice_hook(self, idxs: list[int]):
        def hook(param: torch.Tensor) -> None:
            for i in idxs:
                s = self.slices[i]
                accumulate_grad(self.shadows[i], param.grad.narrow(s.dim, s.start, s.stop - s.start))
            param.grad = None  # the fused gradient is not kept: memory of one expert, not E
        return hook

    def _master_hook(self, master: nn.Parameter):
        def hook(param: torch.Tensor) -> None:
            accumulate_grad(master, param.grad)
            param.grad = None
        return hook

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the leaves into the model (rounded to nearest in the model's dtype)."""
        for s, shadow in zip(self.slices, self.shadows, strict=True):
            s.view().copy_(shadow)
        for p, master in self.masters:
            p.data.copy_(master)

    @torch.no_grad()
    def read_back(self) -> None:
        """Take what a hook changed in the model's slices / tensors in place (a projection) into the
        leaves. A leaf of the model's dtype is copied; an fp32 master of a bf16/fp16 tensor gets only
        the change added, so it keeps its precision below the model dtype's resolution."""
        pairs = [(s.view(), sh) for s, sh in zip(self.slices, self.shadows, strict=True)]
        pairs += [(p.data, m) for p, m in self.masters]
        for model_t, leaf in pairs:
            if leaf.dtype == model_t.dtype:
                leaf.copy_(model_t)
            else:  # before the hook the model held round(leaf): add the hook's change
                leaf.add_(model_t.to(leaf.dtype) - leaf.to(model_t.dtype).to(leaf.dtype))

    def after_step(self, step: int) -> None:
        self.write_back()

    def after_resume(self, step: int) -> None:
        self.write_back()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
