"""Stage 2, plan: what a run changes (its `TrainedTensor`s) and which layers each step touches.

The scope resolves into whole parameters and expert slices (moe_unlearn.unlearning.scopes); the
method may narrow that (ablate keeps the down projections only); an adapter on a scope whose
experts are fused splits them per expert (one low-rank delta per expert matrix). From the trained
tensors follow the first trained decoder layer (prefix caching), the layer a representation
objective reads (RMU), the routers the anchor holds and those the retain-routing KL watches. A
routing that keeps routers fixed (routing="frozen" / "forced") takes every router out of the scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from moe_unlearn.arch import MoELayer, find_moe_layers
from moe_unlearn.arch.discovery import adapter_for, decoder_layers
from moe_unlearn.arch.target import ExpertTarget
from moe_unlearn.errors import BadInputError
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.methods import Method
from moe_unlearn.unlearning.routing import ROUTINGS
from moe_unlearn.unlearning.scopes import SCOPES, ScopePlan, resolve_scope
from moe_unlearn.unlearning.tensor import TrainedTensor

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Plan:
    """What a run changes. scope: the resolved scope (the parameters and `ExpertSlice`s, which train);
    tensors: every trained tensor, in patch order (whole parameters, then slices, with role and owner);
    hidden_layer: the decoder layer whose output the objective reads (RMU), else None; start: the
    first decoder layer a step must run (prefix caching), else None; anchor_layers: {layer: target
    experts} whose router the anchor holds; rr_layers: layers whose routing the retain KL watches."""

    scope: ScopePlan
    tensors: tuple[TrainedTensor, ...]
    targets: tuple[ExpertTarget, ...]
    layers: tuple[MoELayer, ...]
    hidden_layer: int | None
    start: int | None
    anchor_layers: dict[int, list[int]]
    rr_layers: tuple[int, ...]

    @property
    def by_idx(self) -> dict[int, MoELayer]:
        return {layer.layer_idx: layer for layer in self.layers}

    @property
    def capture_layers(self) -> list[MoELayer]:
        """The MoE layers whose routing a step records (anchor and retain-routing KL)."""
        by_idx = self.by_idx
        return [by_idx[i] for i in sorted(set(self.anchor_layers) | set(self.rr_layers))]

    def num_trainable(self) -> int:
        return self.scope.num_trainable()


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    return decoder_layers(model, adapter_for(model).decoder_layer_lists)[1]


def trained_layers(tensors: tuple[TrainedTensor, ...] | list[TrainedTensor]) -> list[int] | None:
    """Decoder-layer indices of every trained tensor; None if anything outside the layers trains."""
    found = []
    for t in tensors:
        m = _LAYER_RE.search(t.name)
        if m is None:
            return None
        found.append(int(m.group(1)))
    return found


def make_plan(cfg: UnlearnConfig, method: Method, hp: dict[str, Any], model: nn.Module,
              targets: list[ExpertTarget]) -> Plan:
    """The plan of a checked config on `model` (BadInputError for targets the model does not have)."""
    layers = find_moe_layers(model)
    by_idx = {layer.layer_idx: layer for layer in layers}
    if method.routed_only:
        _check_routed(method, targets, by_idx)
    scope = resolve_scope(model, layers, cfg.scope, targets, allow_shared=cfg.allow_shared)
    routing = ROUTINGS.lookup(cfg.routing)
    if not routing.trains_routers:  # frozen / forced routing: no router parameter trains, whatever the scope
        routers = {n for layer in layers for n, _ in layer.router_parameters()}
        scope.whole = [(n, p) for n, p in scope.whole if n not in routers]
        scope.router_layers = []
    if method.roles is not None:  # the method edits these slices of the targets only
        scope.slices = [s for s in scope.slices if s.role in method.roles]
        scope.whole, scope.router_layers = [], []
    owner = _slice_owners(layers, scope, split=cfg.adapter is not None and SCOPES.lookup(cfg.scope).split_experts)
    tensors = tuple([TrainedTensor(n) for n, _ in scope.whole]
                    + [TrainedTensor.of_slice(s, owner.get(TrainedTensor.of_slice(s).key)) for s in scope.slices])
    if not tensors and method.roles is not None:
        raise BadInputError(f"method {method.name!r} needs at least one target expert")
    if not tensors and not routing.trains_routers:
        raise BadInputError(f"scope {cfg.scope!r} with routing={cfg.routing!r} trains nothing (its routers are "
                            "frozen); choose another scope or routing='learned'")
    if cfg.router_projection is not None and not scope.router_layers:
        raise BadInputError(f"router_projection={cfg.router_projection!r}: scope {cfg.scope!r} trains no router")
    found = trained_layers(tensors)
    first = min(found) if found else None
    anchor: dict[int, list[int]] = {}
    if method.trains and routing.trains_routers and SCOPES.lookup(cfg.scope).reads_targets and cfg.anchor_weight:
        for t in targets:
            if not t.shared:
                anchor.setdefault(t.layer, []).append(int(t.expert))
    return Plan(scope=scope, tensors=tensors, targets=tuple(targets), layers=tuple(layers),
                hidden_layer=_hidden_layer(method, hp, model, first, targets),
                start=first if cfg.prefix_cache else None, anchor_layers=anchor,
                rr_layers=tuple(scope.router_layers) if cfg.retain_routing_weight else ())


def _check_routed(method: Method, targets: list[ExpertTarget], by_idx: dict[int, MoELayer]) -> None:
    for t in targets:
        if t.shared:
            raise BadInputError(f"target {t}: {method.name!r} removes routed experts only, not shared ones")
        if t.layer not in by_idx:
            raise BadInputError(f"target {t}: layer {t.layer} is not an MoE layer ({sorted(by_idx)})")


def _slice_owners(layers: list[MoELayer], scope: ScopePlan, *, split: bool) -> dict[tuple, tuple[int, int]]:
    """(layer, expert) of every trained expert slice. With `split` (an adapter on a scope of whole expert
    tensors), the fused expert tensors are first split into per-expert slices (one low-rank delta each)."""
    owner: dict[tuple, tuple[int, int]] = {}
    for layer in layers:
        for e in range(layer.num_experts):
            for sl in layer.expert_slices(e):
                owner[TrainedTensor.of_slice(sl).key] = (layer.layer_idx, e)
                if split:
                    scope.slices.append(sl)
    if split:
        covered = {sl.name for sl in scope.slices}
        scope.whole = [(n, p) for n, p in scope.whole if n not in covered]
    return owner


def _hidden_layer(method: Method, hp: dict[str, Any], model: nn.Module, first: int | None,
                  targets: list[ExpertTarget]) -> int | None:
    """The decoder layer whose output a representation objective (RMU) reads: hp["layer"], else
    the highest target layer, else the middle layer; it must be at or above the trained layers."""
    objective = method.objective
    if objective is None or not objective.reads_hidden:
        return None
    num_layers = len(decoder_layer_list(model))
    layer = hp["layer"]
    if layer is None:
        trained = {t.layer for t in targets} or None
        layer = max(trained) if trained else num_layers // 2
    if not 0 <= layer < num_layers:
        raise BadInputError(f"{objective.name} layer {layer} out of range (0..{num_layers - 1})")
    if first is not None and layer < first:
        raise BadInputError(f"{objective.name} layer {layer} is below every trained layer (first: {first}); its "
                            "output cannot change. Choose layer >= the target layer")
    return layer


__all__ = ["Plan", "decoder_layer_list", "make_plan", "trained_layers"]
