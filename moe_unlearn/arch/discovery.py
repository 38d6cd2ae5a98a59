"""find_moe_layers: locate the MoE blocks of a model and wrap each in its family adapter."""

from __future__ import annotations

from torch import nn

from moe_unlearn.arch.base import MoELayer
from moe_unlearn.arch.families import ADAPTERS
from moe_unlearn.errors import NotAnMoEModel, UnsupportedFamily


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    raise NotAnMoEModel(f"{type(model).__name__}: no decoder layer list found")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of `model`, in layer order, each behind its family's adapter."""
    model_type = _model_type(model)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        supported = ", ".join(sorted(ADAPTERS))
        has_experts = any(hasattr(m, "experts") for m in model.modules())
        if has_experts:
            raise UnsupportedFamily(f"{type(model).__name__} (model_type={model_type!r}) looks like an MoE model "
                                    f"but no adapter exists for it; supported families: {supported}")
        raise NotAnMoEModel(f"{type(model).__name__} (model_type={model_type!r}) is not a supported MoE model; "
                            f"supported families: {supported}")
    prefix, layers = _decoder_layers(model)
    found: list[MoELayer] = []
    for i, layer in enumerate(layers):
        for child_name in ("mlp", "block_sparse_moe", "feed_forward", "ffn"):
            block = getattr(layer, child_name, None)
            if block is None or not hasattr(block, "experts"):
                continue
            router = getattr(block, "gate", None) or getattr(block, "router", None)
            found.append(adapter(
                model=model, layer_idx=i, path=f"{prefix}.{i}.{child_name}", block=block, router=router,
                experts=block.experts, num_experts=int(router.num_experts), top_k=int(router.top_k),
                shared_experts=getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None),
                shared_expert_gate=getattr(block, "shared_expert_gate", None),
            ))
    if not found:
        raise NotAnMoEModel(f"{type(model).__name__}: no MoE block found in its decoder layers")
    return found
