"""TRACE-style retain reweighting (`retain_weighting="trace"`).

Forget data activates a few experts far more than retain data does, so those experts get little
retain signal while the forget loss pushes on them. TRACE (arXiv 2606.10338) reweights the
token-level retain losses so that each forget-critical expert's retain activation frequency is
raised toward its forget frequency. The concrete form used here (ours; the paper's may differ):

    w_t = 1 + sum over critical e in topK_l(t) of max(0, p_f(e) / p_r(e) - 1),

normalised to mean 1 over all real retain tokens, with p_f(e) / p_r(e) the share of forget /
retain tokens whose top-K holds e (p_r floored at half a token, as attribution's selectivity),
measured once with the original model. Critical experts: the scope's targets (uoe / topm), or
else every routed expert with p_f / p_r >= 2. GA has no retain term, so it is unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_unlearn.arch import MoELayer, RoutingCapture
from moe_unlearn.registry import Choice, registry_of

RETAIN_WEIGHTINGS = registry_of("retain_weighting", Choice(
    "trace", "retain tokens weighted by how forget-critical their experts are", needs_retain=True))
CRITICAL_RATIO = 2.0


@torch.no_grad()
def _topk_per_batch(model: nn.Module, batches: list[dict[str, torch.Tensor]], layers: list[MoELayer],
                    device: torch.device) -> list[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
    out = []
    with RoutingCapture(model, layers) as cap:
        for b in batches:
            cap.clear()
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                  use_cache=False)
            rec = cap.last
            out.append((rec.mask.cpu(), {i: rec.layers[i].topk_idx.cpu() for i in rec.layers}))
    return out


def _frequency(routed, layer: MoELayer) -> tuple[torch.Tensor, int]:
    counts = torch.zeros(layer.num_experts, dtype=torch.float64)
    n = 0
    for mask, topk in routed:
        idx = topk[layer.layer_idx][mask]
        counts += torch.bincount(idx.reshape(-1).long(), minlength=layer.num_experts).double()
        n += int(mask.sum())
    return counts / max(n, 1), n


def trace_weights(model: nn.Module, forget_batches: list[dict[str, torch.Tensor]],
                  retain_batches: list[dict[str, torch.Tensor]], layers: list[MoELayer],
                  critical: dict[int, list[int]] | None, device: torch.device
                  ) -> tuple[list[torch.Tensor], dict]:
    """Per retain batch a [B, S] token-weight tensor (0 on padding), and a report of the
    critical experts and their frequency ratios."""
    f_routed = _topk_per_batch(model, forget_batches, layers, device)
    r_routed = _topk_per_batch(model, retain_batches, layers, device)
    bonus: dict[int, torch.Tensor] = {}
    report: dict = {"critical": {}, "ratio": {}}
    for layer in layers:
        pf, _ = _frequency(f_routed, layer)
        pr, n_r = _frequency(r_routed, layer)
        ratio = pf / pr.clamp(min=0.5 / max(n_r, 1))
        exps = critical.get(layer.layer_idx, []) if critical is not None else \
            [e for e in range(layer.num_experts) if ratio[e] >= CRITICAL_RATIO]
        if not exps:
            continue
        b = torch.zeros(layer.num_experts, dtype=torch.float64)
        b[exps] = (ratio[exps] - 1).clamp(min=0)
        bonus[layer.layer_idx] = b
        report["critical"][str(layer.layer_idx)] = list(map(int, exps))
        report["ratio"][str(layer.layer_idx)] = [round(float(ratio[e]), 4) for e in exps]
    weights = []
    for (mask, topk), batch in zip(r_routed, retain_batches, strict=True):
        w = torch.ones(mask.shape[0], dtype=torch.float64)
        for idx, b in bonus.items():
            w += b[topk[idx].long()].sum(-1)
        weights.append((w * mask).view(batch["input_ids"].shape))
    total = sum(float(w.sum()) for w in weights)
    count = sum(int(m.sum()) for m, _ in r_routed)
    scale = count / total if total > 0 else 1.0
    weights = [(w * scale).float() for w in weights]
    report["max_weight"] = round(max(float(w.max()) for w in weights), 4) if weights else 1.0
    return weights, report


__all__ = ["RETAIN_WEIGHTINGS", "trace_weights"]
