"""model_summary: what an MoE model's sparse layers are, in numbers (used by `moe-unlearn inspect`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_unlearn.arch.discovery import adapter_for, decoder_layers, find_moe_layers, model_type


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def model_summary(model: nn.Module) -> dict[str, Any]:
    """A JSON-serialisable description of `model`'s MoE structure.

    Keys: model_class, family (model_type), routing_rule, score_kind, total_params,
    num_decoder_layers, moe_layer_indices, dense_layer_indices, num_experts, top_k,
    has_shared_experts, params_per_expert, expert_pct_of_model (one routed expert as % of all
    parameters), routed_expert_params (all routed experts of all layers), and `layers`: one dict
    per MoE layer (layer, path, router_path, experts, top_k, shared_experts, shared_expert_params,
    router_params, params_per_expert, expert_pct_of_model). Works on meta-device models too.
    """
    layers = find_moe_layers(model)
    adapter = adapter_for(model)
    _, decoder = decoder_layers(model, adapter.decoder_layer_lists)
    total = sum(p.numel() for p in model.parameters())
    per_layer = []
    for lay in layers:
        per_expert = lay.expert_num_params()
        per_layer.append({
            "layer": lay.layer_idx, "path": lay.path, "router_path": lay.router_path, "experts": lay.num_experts,
            "top_k": lay.top_k, "shared_experts": lay.has_shared_experts,
            "shared_expert_params": lay.shared_expert_num_params(), "router_params": lay.router_num_params(),
            "params_per_expert": per_expert, "expert_pct_of_model": _pct(per_expert, total),
        })
    moe_idx = [lay.layer_idx for lay in layers]
    first = per_layer[0]
    return {
        "model_class": type(model).__name__,
        "family": model_type(model),
        "routing_rule": layers[0].routing_rule,
        "score_kind": layers[0].score_kind,
        "total_params": total,
        "num_decoder_layers": len(decoder),
        "moe_layer_indices": moe_idx,
        "dense_layer_indices": [i for i in range(len(decoder)) if i not in set(moe_idx)],
        "num_experts": first["experts"],
        "top_k": first["top_k"],
        "has_shared_experts": any(d["shared_experts"] for d in per_layer),
        "params_per_expert": first["params_per_expert"],
        "expert_pct_of_model": first["expert_pct_of_model"],
        "routed_expert_params": sum(d["params_per_expert"] * d["experts"] for d in per_layer),
        "layers": per_layer,
    }
