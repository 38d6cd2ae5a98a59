"""Seeing through wrappers: DDP / FSDP / PEFT models, and PEFT's wrapped layers and parameters.

Everything the toolkit names (MoE layer paths, patch entries, adapter keys) is named as in the
bare transformers model, so a patch made on a PEFT-wrapped model applies to the stock model and
back. Two kinds of wrapper are removed:

- around the whole model: DistributedDataParallel / DataParallel / FSDP1 / a DeepSpeed engine (`.module`;
  FSDP2's `fully_shard` does not wrap, it swaps parameters for DTensors in place) and a PEFT
  `PeftModel` (`get_base_model()`, which drops the `base_model.model.` prefix);
- around single modules inside it: a PEFT tuner layer (a LoRA `Linear`, or the `ParamWrapper`
  PEFT puts around fused 3-D expert parameters) keeps the original module as `base_layer`, so
  its weights are named `<module>.base_layer.<param>`; the canonical name drops `.base_layer`.

PEFT's own adapter weights (its `lora_A`, `lora_B`, ... listed by each layer's `adapter_layer_names`
and `other_param_names`) are no part of the base model and are left out of `canonical_parameters`.
peft itself is never imported here: the wrappers are recognised by their attributes.
"""

from __future__ import annotations

from torch import nn

_MODEL_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")
_BASE_LAYER = "base_layer"


def _is_peft(obj: object) -> bool:
    return type(obj).__module__.split(".", 1)[0] == "peft"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DataParallel / FSDP and PEFT wrappers (the model itself if bare)."""
    for _ in range(8):  # wrappers nest at most a few deep (DDP around a PeftModel)
        inner = getattr(model, "module", None)
        # DDP / DataParallel / FSDP1 / DeepSpeed engines and other `.module` wrappers: a model of their own
        # has a config, a wrapper does not
        if isinstance(inner, nn.Module) and (type(model).__name__ in _MODEL_WRAPPERS
                                             or getattr(model, "config", None) is None):
            model = inner
        elif _is_peft(model) and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif _is_peft(model) and isinstance(getattr(model, "model", None), nn.Module):  # a bare tuner (LoraModel)
            model = model.model
        else:
            return model
    return model


def is_peft_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer: holds the original module as `base_layer` and its adapters beside it."""
    return _is_peft(module) and isinstance(getattr(module, _BASE_LAYER, None), nn.Module)


def peft_base_layer(module: nn.Module) -> nn.Module:
    """The original module inside (possibly nested) PEFT tuner layers; `module` itself if not wrapped."""
    while is_peft_layer(module):
        module = getattr(module, _BASE_LAYER)
    return module


def canonical_name(name: str) -> str:
    """A parameter / module name as in the bare model: no `base_model.model.` prefix, no `.base_layer`."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    parts = [p for p in name.split(".") if p != _BASE_LAYER]
    return ".".join(parts)


def _peft_adapter_params(model: nn.Module) -> set[int]:
    """ids of the parameters PEFT added (adapter weights), found through each tuner layer's own lists."""
    ids: set[int] = set()
    for module in model.modules():
        if not is_peft_layer(module):
            continue
        for attr in (*getattr(module, "adapter_layer_names", ()), *getattr(module, "other_param_names", ())):
            holder = getattr(module, attr, None)
            if isinstance(holder, nn.Module):  # ModuleDict / ParameterDict of the adapters
                ids.update(id(p) for p in holder.parameters())
    return ids


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """canonical name -> parameter of the base model's weights (PEFT adapter weights left out)."""
    model = unwrap_model(model)
    adapter = _peft_adapter_params(model)
    return {canonical_name(n): p for n, p in model.named_parameters() if id(p) not in adapter}


__all__ = ["canonical_name", "canonical_parameters", "is_peft_layer", "peft_base_layer", "unwrap_model"]
