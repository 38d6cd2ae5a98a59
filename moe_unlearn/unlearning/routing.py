"""`ROUTINGS`: what the routers do while a run trains (routing="learned" | "frozen" | "forced").

Unlearning a Mixture-of-Experts model can forget by routing: the router learns to send the forget
tokens away from the experts that answer them, and replaying the original routing brings the
knowledge back. Keeping the routing fixed makes the loss change the weights that compute the answer:

- learned (default): the scope's routers train with the rest (and the SEUF anchor holds the target
  routers, where it is on);
- frozen: no router ever trains (the scope keeps its other tensors; no anchor is needed);
- forced: frozen, and in addition every MoE layer applies the original model's top-K experts and gate
  weights, recorded once on the same batch with the original weights, in every training forward pass
  (the forcing routing replay uses, `moe_unlearn.arch.forcing.ForcedRouting`). Changed experts in a lower
  layer then cannot re-route the tokens of a higher one either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_unlearn.registry import Registry


@dataclass(frozen=True)
class RoutingMode:
    """trains_routers: the scope's routers may train. forces: the original top-K and gates are forced."""

    name: str
    trains_routers: bool
    forces: bool = False
    help: str = ""


ROUTINGS: Registry[RoutingMode] = Registry("routing mode")
ROUTINGS.register("learned", RoutingMode("learned", trains_routers=True, help="routers train with the scope (default)"))
ROUTINGS.register("frozen", RoutingMode("frozen", trains_routers=False, help="routers never train; no anchor"))
ROUTINGS.register("forced", RoutingMode("forced", trains_routers=False, forces=True,
                                    help="frozen, and the original top-K and gates are forced at every MoE layer"))


@torch.no_grad()
def record_batch_routing(model: nn.Module, layers: Sequence[Any], batch: dict[str, torch.Tensor]) -> dict[int, tuple]:
    """{layer: (top-K indices [T, K], gate weights [T, K])} of `model` on `batch` (every position of
    the padded batch, in the order the routers see them): what `ForcedRouting` forces later."""
    from moe_unlearn.arch import RoutingCapture

    with RoutingCapture(model, list(layers)) as cap:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    rec = cap.records[-1].layers
    return {i: (rec[i].topk_idx.clone(), rec[i].topk_weight.detach().clone()) for i in rec}


__all__ = ["ROUTINGS", "RoutingMode", "record_batch_routing"]
