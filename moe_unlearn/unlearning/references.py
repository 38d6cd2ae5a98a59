"""Stage 6, references: values of the original model, computed once before any step.

What the objective declares it needs (forget log-probs, retain hidden states), the retain routing
for the routing KL, TRACE's retain token weights, RMU's steering direction, and the originals of
the trained tensors, and with routing="forced" the original routing of every batch (what the patch stores and what a failed run restores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch import RoutingCapture
from moe_unlearn.unlearning.batches import Batches, to_device
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.objectives import Objective, rmu_steering, sequence_nll
from moe_unlearn.unlearning.params import adapter_grams
from moe_unlearn.unlearning.patch import snapshot
from moe_unlearn.unlearning.plan import Plan
from moe_unlearn.unlearning.routing import ROUTINGS, record_batch_routing
from moe_unlearn.unlearning.runner import Runner


@dataclass(frozen=True)
class References:
    """originals: CPU copies of the plan's tensors before the run. forget_logp: {forget batch: sequence
    log-probs}; retain_hidden: {retain batch: hidden state of the objective's layer}; retain_scores:
    {retain batch: {layer: routing scores}}; trace_weights: {retain batch: token weights} (TRACE);
    steering: RMU's direction; grams: {tensor index: input Gram factors} (adapters); details: what
    the report records (TRACE's weights summary); forced_routing (routing="forced"): {("f" | "r", batch):
    {layer: (top-K indices, gate weights)}} of the original model on every batch."""

    originals: list[torch.Tensor]
    forget_logp: dict[int, torch.Tensor] = field(default_factory=dict)
    retain_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    retain_scores: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    trace_weights: Any = None
    steering: torch.Tensor | None = None
    grams: dict[int, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    forced_routing: dict[tuple[str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None


def retain_reference_kind(objective: Objective, hp: dict[str, Any], batches: Batches) -> str | None:
    """"logits" / "hidden": what the objective reads of the original model on retain batches (None without retain)."""
    return objective.retain_reference(hp) if batches.retain is not None else None


def compute_references(cfg: UnlearnConfig, objective: Objective | None, hp: dict[str, Any], model: nn.Module,
                       plan: Plan, batches: Batches, device: torch.device) -> References:
    """The originals, and (for a training method) every reference value, with the model in eval mode
    (no dropout, so reference values line up with the trained passes)."""
    originals = snapshot(model, list(plan.tensors))
    if objective is None:
        return References(originals)
    model.eval()
    ref_runner = Runner(model, start=None, cache_bytes=0, cache=False, hidden_layer=plan.hidden_layer,
                        need_logits=True)
    forget_logp: dict[int, torch.Tensor] = {}
    retain_hidden: dict[int, torch.Tensor] = {}
    retain_scores: dict[int, dict[int, torch.Tensor]] = {}
    kind = retain_reference_kind(objective, hp, batches)
    by_idx = plan.by_idx
    with torch.no_grad():
        if objective.forget_reference == "logp":
            for k, b in enumerate(batches.forget):
                b = to_device(b, device)
                logits, _ = ref_runner(("f", k), b)
                forget_logp[k] = -sequence_nll(logits, b["labels"].to(logits.device))[0]
        if batches.retain is not None and (kind == "hidden" or plan.rr_layers):
            for k, b in enumerate(batches.retain):
                b = to_device(b, device)
                with RoutingCapture(model, [by_idx[i] for i in plan.rr_layers]) as cap:
                    _, hidden = ref_runner(("r", k), b)
                if kind == "hidden":
                    retain_hidden[k] = hidden
                if plan.rr_layers:
                    retain_scores[k] = {i: by_idx[i].scores_from_logits(cap.records[-1].layers[i].logits)
                                        for i in plan.rr_layers}
    grams = {}
    if cfg.adapter is not None and cfg.adapter_gram_rank > 0:  # 0: a smaller patch that cannot be fused
        grams = adapter_grams(plan, batches, model, rank=cfg.adapter_gram_rank, device=device)
    trace_w, details = None, {}
    if cfg.retain_weighting == "trace":  # retain token weights by how forget-critical their experts are
        trace_w, details["trace"] = _trace(model, plan, batches, device)
    steering = None
    if objective.reads_hidden:  # the representation target of RMU: a fixed random direction
        steering = rmu_steering(model.config.hidden_size, hp["steering_coeff"], seed=cfg.seed, device=device)
    forced = None
    if ROUTINGS.lookup(cfg.routing).forces:  # the original routing of every batch, forced while training
        forced = {}
        for tag, data in (("f", batches.forget), ("r", batches.retain or [])):
            for k, b in enumerate(data):
                forced[(tag, k)] = record_batch_routing(model, plan.layers, to_device(b, device))
    return References(originals, forget_logp, retain_hidden, retain_scores, trace_w, steering, grams, details,
                      forced)


def _trace(model: nn.Module, plan: Plan, batches: Batches, device: torch.device) -> tuple[Any, Any]:
    from moe_unlearn.unlearning.trace import trace_weights

    critical = None
    if plan.targets:
        critical = {}
        for t in plan.targets:
            if not t.shared:
                critical.setdefault(t.layer, []).append(int(t.expert))
    by_idx = plan.by_idx
    layers = [by_idx[i] for i in sorted(critical)] if critical is not None else list(plan.layers)
    return trace_weights(model, batches.forget, batches.retain, layers, critical, device)


__all__ = ["References", "compute_references", "retain_reference_kind"]
