"""Distillation into noised trained tensors (UNDO, arXiv 2506.06278, restricted to what the run trained).

Suppression left in the weights comes back under fine-tuning; a model that never held the knowledge
does not relearn it. UNDO approximates the latter: after unlearning, the trained tensors are noised
(theta <- (1 - alpha) theta + alpha * noise, noise ~ N(0, std(theta)^2) per tensor; alpha = 1
re-initialises them) and the unlearned model (teacher: the same model with the unlearned values
swapped back in) is distilled into them: KL(teacher || student) per next-token position over every
real token of the paired forget and retain batches, for `distill_steps` steps of the same loop.
Only the plan's tensors are noised and trained, so every other weight keeps its original value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.unlearning.batches import Batches, to_device
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.objectives import kl_to_reference
from moe_unlearn.unlearning.plan import Plan
from moe_unlearn.unlearning.runner import Runner, original_weights
from moe_unlearn.unlearning.tensor import TrainedTensor


@torch.no_grad()
def noise_tensors(model: nn.Module, tensors: tuple[TrainedTensor, ...], alpha: float, seed: int) -> None:
    """theta <- (1 - alpha) theta + alpha * N(0, std(theta)^2), per trained tensor, seeded."""
    params = canonical_parameters(model)
    gen = torch.Generator().manual_seed(seed)
    for t in tensors:
        v = t.view(params)
        std = v.float().std() if v.numel() > 1 else v.float().abs().mean()
        noise = torch.randn(v.shape, generator=gen) * std.cpu()
        v.copy_(((1 - alpha) * v.float() + alpha * noise.to(v.device)).to(v.dtype))


def _real_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every real token as a scored position (the distillation covers whole texts, not answers only)."""
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = -100
    return ids


@dataclass(frozen=True)
class DistillLoss:
    """loss_fn(item): KL(teacher || student) on the item's forget batch, plus its retain batch where there is one."""

    model: nn.Module
    plan: Plan
    batches: Batches
    teacher: list[torch.Tensor]
    runner: Runner
    device: torch.device
    forced: Any = None
    forced_routing: Any = None

    def _kl(self, key: tuple[str, int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.forced is not None:
            self.forced.use(self.forced_routing[key])
        b = to_device(batch, self.device)
        with torch.no_grad(), original_weights(self.model, self.plan.tensors, self.teacher):
            t_logits = self.runner(key, b)[0]
        s_logits = self.runner(key, b)[0]
        return kl_to_reference(s_logits, t_logits, _real_labels(b).to(s_logits.device))

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        kl = self._kl(("f", item["k"]), self.batches.forget[item["k"]])
        if self.batches.retain is not None and item["rk"] is not None:
            kl = kl + self._kl(("r", item["rk"]), self.batches.retain[item["rk"]])
        return {"loss": kl, "distill_kl": kl.detach()}


def distill_config(cfg: UnlearnConfig) -> UnlearnConfig:
    """The run's config for the distillation phase: its own step count, no checkpoints, no projections."""
    return dataclasses.replace(cfg, steps=cfg.distill_steps, epochs=None, checkpoint_every=0, resume=False,
                               router_projection=None, expert_projection=None)


__all__ = ["DistillLoss", "distill_config", "noise_tensors"]
