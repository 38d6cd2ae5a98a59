"""Routing shift against the original model, from two `RoutingRecording`s of the same tokens.

Record the original model once (`record_routing`) and compare any number of edited models
to it (`compare_routing`). Metrics per MoE layer (the expert-selection overlap of the SEUF pilot study and the
routing-shift metrics):
- overlap: per token |topK_new & topK_orig| / K, mean over real tokens (1 = routing unchanged);
- kl: KL(P_orig || P_new) in nats between routing-frequency vectors, P[e] = share of all
  top-K slots of the layer that went to expert e (probabilities below 1e-10 are clamped);
- load_entropy: entropy of P_new in nats (max log E = perfectly balanced load);
- target_gate_mass (one layer, one expert): mean over tokens of the expert's gate value g
  (its full-distribution score where it is in the token's top-K, else 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moe_unlearn.arch.target import ExpertTarget
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.items import ItemsLike, as_items
from moe_unlearn.eval.scoring import PromptFormat, RoutingRecording, encode_items, score_encoded

KL_EPS = 1e-10


@torch.no_grad()
def record_routing(model: nn.Module, tokenizer, data: ItemsLike, *, batch_size: int = 16,
                   fmt: PromptFormat | None = None, progress: bool = False) -> RoutingRecording:
    """Routing of every real token of `data` (tokenised exactly as `evaluate` does with the same
    PromptFormat) through every MoE layer of `model`."""
    encoded = encode_items(tokenizer, as_items(data), fmt)
    return score_encoded(model, tokenizer, encoded, batch_size=batch_size, record_routing=True,
                         progress=progress, desc="routing").routing


def token_overlap(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """[N, K] and [N, K] top-K expert indices -> [N] fraction of each token's experts in common."""
    if idx_a.shape != idx_b.shape:
        raise BadInputError(f"routing shapes differ: {tuple(idx_a.shape)} vs {tuple(idx_b.shape)}")
    same = (idx_a.unsqueeze(2) == idx_b.unsqueeze(1)).any(-1)
    return same.float().mean(-1)


def frequency(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, K] -> [E] fp64 share of the N*K top-K slots taken by each expert."""
    counts = torch.bincount(idx.reshape(-1).long(), minlength=num_experts).double()
    return counts / counts.sum().clamp_min(1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = KL_EPS) -> float:
    """KL(p || q) in nats; terms with p = 0 contribute 0, q is clamped to eps."""
    p, q = p.double(), q.double().clamp_min(eps)
    nz = p > 0
    return float((p[nz] * (p[nz].log() - q[nz].log())).sum())


def entropy(p: torch.Tensor) -> float:
    p = p.double()
    nz = p > 0
    return float(-(p[nz] * p[nz].log()).sum())


def gate_mass(rec: RoutingRecording, layer: int, expert: int) -> tuple[float, float]:
    """(mean gate value, selection rate) of `expert` in `layer` over the recording's tokens."""
    idx, score = rec.topk_idx[layer], rec.topk_score[layer]
    hit = idx == expert
    n = max(idx.shape[0], 1)
    return float((score * hit).sum() / n), float(hit.any(-1).float().sum() / n)


@dataclass
class RoutingComparison:
    """Per-layer routing metrics of one split (lists aligned with `layers`); see module docstring."""

    layers: list[int]
    n_tokens: int
    overlap: list[float]
    kl: list[float]
    load_entropy: list[float]
    load_entropy_original: list[float]
    max_entropy: list[float]
    target: tuple[int, int] | None = None
    target_gate_mass: float | None = None
    target_gate_mass_original: float | None = None
    target_selection_rate: float | None = None
    target_selection_rate_original: float | None = None

    @property
    def overlap_mean(self) -> float:
        return float(sum(self.overlap) / len(self.overlap))

    @property
    def kl_mean(self) -> float:
        return float(sum(self.kl) / len(self.kl))


def check_comparable(new: RoutingRecording, original: RoutingRecording) -> None:
    if new.fingerprint != original.fingerprint or new.tokens_per_item != original.tokens_per_item:
        raise BadInputError("the original routing was recorded on different tokens; record it with "
                            "record_routing on the same data, tokenizer and prompt format")
    if new.layers != original.layers:
        raise BadInputError(f"MoE layers differ: {new.layers} vs original {original.layers}")
    for layer in new.layers:
        if new.num_experts[layer] != original.num_experts[layer]:
            raise BadInputError(f"layer {layer}: {new.num_experts[layer]} experts vs {original.num_experts[layer]} "
                                "in the original model")


def compare_routing(new: RoutingRecording, original: RoutingRecording,
                    target: ExpertTarget | str | Sequence[int] | None = None) -> RoutingComparison:
    """Routing metrics of `new` against `original` (same tokens); a `target` ((layer, expert), "L:E" or an
    ExpertTarget) adds its gate mass."""
    check_comparable(new, original)
    overlap, kl, ent, ent_orig, ent_max = [], [], [], [], []
    for layer in new.layers:
        e = new.num_experts[layer]
        overlap.append(float(token_overlap(new.topk_idx[layer], original.topk_idx[layer]).mean()))
        p_new, p_orig = frequency(new.topk_idx[layer], e), frequency(original.topk_idx[layer], e)
        kl.append(kl_divergence(p_orig, p_new))
        ent.append(entropy(p_new))
        ent_orig.append(entropy(p_orig))
        ent_max.append(math.log(e))
    result = RoutingComparison(new.layers, new.num_tokens, overlap, kl, ent, ent_orig, ent_max)
    if target is not None:
        t = ExpertTarget.coerce(target)
        if t.shared:
            raise BadInputError("gate mass is defined for routed experts only, not for shared experts")
        layer, expert = t.layer, int(t.expert)
        if layer not in new.topk_idx:
            raise BadInputError(f"target layer {layer} is not an MoE layer; MoE layers: {new.layers}")
        if not 0 <= expert < new.num_experts[layer]:
            raise BadInputError(f"target expert {expert} out of range 0..{new.num_experts[layer] - 1}")
        result.target = (layer, expert)
        result.target_gate_mass, result.target_selection_rate = gate_mass(new, layer, expert)
        result.target_gate_mass_original, result.target_selection_rate_original = gate_mass(original, layer, expert)
    return result
