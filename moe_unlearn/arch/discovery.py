"""find_moe_layers: locate the MoE blocks of a model and wrap each in its family adapter."""

from __future__ import annotations

from torch import nn

from moe_unlearn.arch.base import MoELayer
from moe_unlearn.arch.families import ADAPTERS, NOT_SUPPORTED
from moe_unlearn.arch.megablocks import MegablocksLayer, has_megablocks_blocks
from moe_unlearn.arch.wrappers import unwrap_model
from moe_unlearn.errors import BadInputError, NotAnMoEModel, UnsupportedFamily


def _supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def decoder_layers(model: nn.Module, list_names: tuple[str, ...] = ("layers",)) -> tuple[str, nn.ModuleList]:
    """(module path, ModuleList) of the model's decoder layers: the first ModuleList whose
    name ends in one of `list_names` (`model.layers`, DBRX `transformer.blocks`)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in list_names and isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    raise NotAnMoEModel(f"{type(model).__name__}: no decoder layer list ({', '.join(list_names)}) found; "
                        f"supported MoE families: {_supported()}")


def model_type(model: nn.Module) -> str:
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def adapter_for(model: nn.Module) -> type[MoELayer]:
    """The adapter class of `model`'s family (MegablocksLayer for a model of no transformers MoE
    family that contains megablocks blocks); NotAnMoEModel / UnsupportedFamily otherwise."""
    model = unwrap_model(model)
    mtype = model_type(model)
    adapter = ADAPTERS.get(mtype)
    if adapter is None:
        if has_megablocks_blocks(model):  # a custom model built from megablocks MoE / dMoE blocks
            return MegablocksLayer
        has_experts = any(hasattr(m, "experts") for m in model.modules())
        if has_experts or mtype in NOT_SUPPORTED:
            why = NOT_SUPPORTED.get(mtype, "no adapter exists for it")
            raise UnsupportedFamily(f"{type(model).__name__} (model_type={mtype!r}) looks like an MoE model "
                                    f"but {why}; supported families: {_supported()}")
        raise NotAnMoEModel(f"{type(model).__name__} (model_type={mtype!r}) is not a supported MoE model; "
                            f"supported families: {_supported()}")
    return adapter


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of `model`, in layer order, each behind its family's adapter.
    Dense decoder layers (mlp_only_layers, decoder_sparse_step, first_k_dense_replace) are skipped.
    DDP / FSDP / PEFT wrappers are seen through (`unwrap_model`): paths and parameter names are those
    of the bare transformers model."""
    model = unwrap_model(model)
    adapter = adapter_for(model)
    if issubclass(adapter, MegablocksLayer):
        return adapter.find_layers(model)
    prefix, layers = decoder_layers(model, adapter.decoder_layer_lists)
    found: list[MoELayer] = []
    for i, layer in enumerate(layers):
        for child_name in adapter.block_names:
            block = getattr(layer, child_name, None)
            if block is None or not adapter.is_moe_block(block):
                continue
            found.append(adapter.from_block(model=model, layer_idx=i, path=f"{prefix}.{i}.{child_name}",
                                            block=block))
            break
    if not found:
        raise NotAnMoEModel(f"{type(model).__name__}: no MoE block found in its decoder layers "
                            f"(supported families: {_supported()})")
    for layer in found:  # a config routing to more experts than exist would fail deep inside torch.topk
        if not 1 <= layer.top_k <= layer.num_experts:
            raise BadInputError(f"{layer.path}: the config routes each token to top-{layer.top_k} of "
                                f"{layer.num_experts} experts; top-K must be between 1 and the number of experts")
    return found
