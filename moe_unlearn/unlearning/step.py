"""Stage 7, step loss: the loss of one training item.

The objective on one forget batch (and its paired retain batch), plus the router anchor on the
target layers and the KL of the retain routing at the trained routers, where they are on. With
routing="forced" every pass runs with its batch's original top-K and gates forced; with sam_rho the
forget part's gradient is taken at the sharpness-aware point (moe_unlearn.unlearning.sam).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch import RoutingCapture
from moe_unlearn.arch.forcing import ForcedRouting
from moe_unlearn.unlearning.anchor import anchor_target, retain_routing_kl, router_anchor_loss
from moe_unlearn.unlearning.batches import Batches, to_device
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.objectives import Objective, ObjectiveInputs
from moe_unlearn.unlearning.plan import Plan
from moe_unlearn.unlearning.references import References, retain_reference_kind
from moe_unlearn.unlearning.runner import Runner, align_forget, align_retain, original_weights
from moe_unlearn.unlearning.sam import linear_term, sam_forget_gradient

LossFn = Callable[[dict[str, Any]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class StepLoss:
    """loss_fn(item) for the training loop (item: {"k": forget batch, "rk": retain batch or None})."""

    cfg: UnlearnConfig
    objective: Objective
    hp: dict[str, Any]
    model: nn.Module
    plan: Plan
    batches: Batches
    ref: References
    runner: Runner
    device: torch.device
    forced: ForcedRouting | None = None  # routing="forced": set to each batch's original routing before its pass

    def _force(self, key: tuple[str, int]) -> None:
        if self.forced is not None:
            self.forced.use(self.ref.forced_routing[key])

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        k, rk = item["k"], item["rk"]
        fb = to_device(self.batches.forget[k], self.device)
        inp = ObjectiveInputs(forget_labels=fb["labels"], forget_mask=fb["attention_mask"],
                              forget_ref_logp=self.ref.forget_logp.get(k), steering=self.ref.steering)
        self._force(("f", k))  # (a forced pass of the original weights is the original pass, bit for bit)
        if self.objective.forget_reference == "logits":  # the teacher's logits on this forget batch (EUL)
            with torch.no_grad(), original_weights(self.model, self.plan.tensors, self.ref.originals):
                inp.forget_ref_logits = self.runner(("f", k), fb)[0]
        rb = self._retain_inputs(inp, rk)
        terms: dict[str, torch.Tensor] = {}
        extra = []
        with RoutingCapture(self.model, self.plan.capture_layers, detach=False) as cap:
            self._force(("f", k))
            inp.forget_logits, inp.forget_hidden = self.runner(("f", k), fb)
            align_forget(inp)
            if self.plan.anchor_layers:
                anchor = self._anchor(cap, fb)
                terms["anchor"] = anchor.detach()
                extra.append(self.cfg.anchor_weight * anchor)
            if rb is not None:
                cap.clear()
                self._force(("r", rk))
                inp.retain_logits, inp.retain_hidden = self.runner(("r", rk), rb)
                inp.retain_labels, inp.retain_mask = rb["labels"], rb["attention_mask"]
                inp.retain_ref_hidden = self.ref.retain_hidden.get(rk)
                align_retain(inp)
                if self.plan.rr_layers:
                    rr = self._retain_routing(cap, rb, rk)
                    terms["retain_routing"] = rr.detach()
                    extra.append(self.cfg.retain_routing_weight * rr)
        if self.cfg.sam_rho:
            out = self._sharpness_aware(inp, k, fb)
        else:
            out = dict(self.objective.loss(inp, self.hp))
        out["loss"] = out["loss"] + sum(e.to(out["loss"].device) for e in extra) if extra else out["loss"]
        out.update(terms)
        return out

    def _sharpness_aware(self, inp: ObjectiveInputs, k: int, fb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objective's terms with the forget part's gradient taken at theta + eps (moe_unlearn.unlearning.sam)."""
        def forget_only(logits: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
            return self.objective.loss(dataclasses.replace(inp, forget_logits=logits, forget_hidden=hidden,
                                                           retain_logits=None, retain_labels=None, retain_mask=None,
                                                           retain_hidden=None), self.hp)["loss"]

        def again() -> torch.Tensor:
            self._force(("f", k))
            return forget_only(*self.runner(("f", k), fb))

        g_sam = sam_forget_gradient(self.model, self.plan.tensors, forget_only(inp.forget_logits, inp.forget_hidden),
                                    again, self.cfg.sam_rho)
        detached = dataclasses.replace(inp, forget_logits=_detach(inp.forget_logits),
                                       forget_hidden=_detach(inp.forget_hidden))
        out = dict(self.objective.loss(detached, self.hp))  # value L(theta); gradient: the retain part only
        out["loss"] = out["loss"] + linear_term(self.model, self.plan.tensors, g_sam).to(out["loss"].device)
        return out

    def _retain_inputs(self, inp: ObjectiveInputs, rk: int | None) -> dict[str, torch.Tensor] | None:
        """The paired retain batch on the device (None when the step runs no retain pass), and its references."""
        if self.batches.retain is None or not (self.objective.uses_retain(self.hp) or self.plan.rr_layers):
            return None
        rb = to_device(self.batches.retain[rk], self.device)
        self._force(("r", rk))
        if self.ref.trace_weights is not None:
            inp.retain_weight = self.ref.trace_weights[rk].to(self.device)
        if retain_reference_kind(self.objective, self.hp, self.batches) == "logits":
            with torch.no_grad(), original_weights(self.model, self.plan.tensors, self.ref.originals):
                inp.retain_ref_logits = self.runner(("r", rk), rb)[0]
        return rb

    def _routed(self, cap: RoutingCapture, layer_idx: int) -> torch.Tensor:
        return self.plan.by_idx[layer_idx].scores_from_logits(cap.records[-1].layers[layer_idx].logits)

    def _anchor(self, cap: RoutingCapture, fb: dict[str, torch.Tensor]) -> torch.Tensor:
        """SEUF's router anchor, averaged over the target layers (each router on its own device)."""
        fmask = fb["attention_mask"].reshape(-1).bool()
        by_idx = self.plan.by_idx
        vals = []
        for i, exps in self.plan.anchor_layers.items():
            scores = self._routed(cap, i)
            vals.append(router_anchor_loss(scores, fmask.to(scores.device), anchor_target(
                by_idx[i].num_experts, exps, device=scores.device)).to(self.device))
        return torch.stack(vals).mean()

    def _retain_routing(self, cap: RoutingCapture, rb: dict[str, torch.Tensor], rk: int) -> torch.Tensor:
        """KL(original || current) of the routing on retain tokens, averaged over the watched layers."""
        rmask = rb["attention_mask"].reshape(-1).bool()
        return torch.stack([retain_routing_kl(self.ref.retain_scores[rk][i], cur, rmask.to(cur.device)).to(self.device)
                            for i in self.plan.rr_layers for cur in (self._routed(cap, i),)]).mean()


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


__all__ = ["LossFn", "StepLoss"]
