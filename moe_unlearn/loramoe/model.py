"""Injecting LoRAMoE into a transformers model, and saving / loading the adapter.

An adapter on disk is a folder with two files: `adapter.safetensors` (LoRA experts and
routers only, keyed by the wrapped module's name) and `loramoe_config.json`. It loads onto
an unmodified model of the same architecture.

Names are those of the bare transformers model (`moe_unlearn.arch.wrappers.canonical_name`): on a
PEFT-wrapped model a target linear PEFT already wrapped is found as its `base_layer` and wrapped
there (PEFT's LoRA and the mixture then both apply), and the adapter still loads onto a stock model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_unlearn.arch.wrappers import canonical_name, unwrap_model
from moe_unlearn.atomic import atomic_dir
from moe_unlearn.errors import BadInputError, PatchError
from moe_unlearn.loramoe.config import ATTENTION_TARGETS, LoRAMoEConfig
from moe_unlearn.loramoe.layer import LoRAMoELinear

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "loramoe_config.json"
_CONFIG_ATTR = "_loramoe_config"
_ADAPTER_PARAMS = ("lora_A", "lora_B", "router")


def target_paths(model: nn.Module, config: LoRAMoEConfig) -> dict[str, str]:
    """canonical name -> module path (in `unwrap_model(model)`) of every nn.Linear `add_loramoe` wraps:
    those whose canonical name ends in a target_modules entry (lm_head never). A linear inside a PEFT
    layer is its `base_layer`; PEFT's own adapter linears (`lora_A.<adapter>`) never match."""
    wanted = set(config.target_modules)
    out = {}
    for path, module in unwrap_model(model).named_modules():
        name = canonical_name(path)
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted and name != "lm_head":
            out[name] = path
    return out


def find_targets(model: nn.Module, config: LoRAMoEConfig) -> list[str]:
    """Canonical names of the nn.Linear modules `add_loramoe` would wrap (lm_head never)."""
    return list(target_paths(model, config))


def add_loramoe(model: nn.Module, config: LoRAMoEConfig) -> nn.Module:
    """Wrap every target nn.Linear of `model` in a LoRAMoELinear, in place, and freeze the rest.

    Afterwards only the LoRA experts and routers have requires_grad=True. Returns `model`.
    """
    if loramoe_layers(model):
        raise BadInputError("this model already has LoRAMoE layers; load or add an adapter only once")
    targets = target_paths(model, config)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise BadInputError(
            f"no nn.Linear named {config.target_modules} in {type(model).__name__}. Routed experts of MoE models "
            f"are fused 3-D parameters, not nn.Linear, so only dense MLPs, shared experts and attention "
            f"projections can be targets; this model's linear layers are named {linear} (attention: "
            f"target_modules={list(ATTENTION_TARGETS)})")
    _check_adapter_memory(model, targets, config)
    for p in model.parameters():
        p.requires_grad_(False)
    _replace(model, {path: LoRAMoELinear(unwrap_model(model).get_submodule(path), config, name=name)
                     for name, path in targets.items()})
    setattr(unwrap_model(model), _CONFIG_ATTR, config)
    return model


def _check_adapter_memory(model: nn.Module, targets: dict[str, str], config: LoRAMoEConfig) -> None:
    """Before anything is allocated: the experts' A [r, in] and B [out, r] and the router [E, in] of every
    target, with their gradients and two Adam moments in fp32, must fit the device's free memory (an expert
    count of fifty million would otherwise try to allocate terabytes)."""
    from moe_unlearn.validate import check_allocation

    root = unwrap_model(model)
    nbytes, device = 0, None
    for path in targets.values():
        lin = root.get_submodule(path)
        device = lin.weight.device
        nbytes += 16 * config.num_experts * (config.rank * (lin.in_features + lin.out_features) + lin.in_features)
    check_allocation(f"LoRAMoE adapters of {config.num_experts} experts of rank {config.rank} on {len(targets)} "
                     "layers", nbytes, device)


def _replace(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module at its path (in the bare model)."""
    root = unwrap_model(model)
    for path, module in modules.items():
        parent_name, _, child = path.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def loramoe_layers(model: nn.Module) -> dict[str, LoRAMoELinear]:
    """The model's LoRAMoE layers by the name of the linear they wrap."""
    return {m.name: m for m in model.modules() if isinstance(m, LoRAMoELinear)}


def get_loramoe_config(model: nn.Module) -> LoRAMoEConfig:
    config = getattr(unwrap_model(model), _CONFIG_ATTR, None)
    if config is None:
        raise BadInputError(f"{type(model).__name__} has no LoRAMoE adapter; call add_loramoe or load_loramoe")
    return config


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """'<wrapped linear>.<lora_A|lora_B|router>' -> parameter: everything the adapter trains and saves."""
    out = {}
    for name, layer in loramoe_layers(model).items():
        for pname in _ADAPTER_PARAMS:
            p = getattr(layer, pname)
            if p is not None:
                out[f"{name}.{pname}"] = p
    return out


def save_loramoe(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter folder atomically (temp folder, then rename); replaces an existing adapter."""
    config = get_loramoe_config(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model).items()}
    path = Path(path)
    with atomic_dir(path, replace=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "moe_unlearn.loramoe"})
        config.save(tmp / CONFIG_FILE)
    return path


def load_loramoe(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapter saved at `path` to a stock `model` (in place). Checks every key and shape first,
    so a mismatching adapter leaves the model untouched."""
    path = Path(path)
    if not (path / ADAPTER_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise BadInputError(f"{path} is not a LoRAMoE adapter folder: it needs {ADAPTER_FILE} and {CONFIG_FILE}")
    try:
        tensors = load_file(str(path / ADAPTER_FILE))
    except Exception as exc:  # safetensors raises its own error type on a truncated or garbled file
        raise PatchError(f"cannot read {path / ADAPTER_FILE} ({' '.join(str(exc).split())[:200]}); the adapter "
                         "is damaged") from None
    return add_loramoe_with_weights(model, LoRAMoEConfig.load(path / CONFIG_FILE), tensors, str(path))


def add_loramoe_with_weights(model: nn.Module, config: LoRAMoEConfig, tensors: dict[str, torch.Tensor],
                             where: str) -> nn.Module:
    """add_loramoe, then copy in `tensors` ('<layer>.<lora_A|lora_B|router>'); every key, shape and value is
    checked first, so a mismatch leaves the model untouched. `where` names the source in errors."""
    bad = [k for k, v in tensors.items() if "." not in k or (v.is_floating_point() and not bool(v.isfinite().all()))]
    if bad:
        raise PatchError(f"adapter {where}: tensors {bad[:3]} are misnamed or hold NaN/inf; the adapter is damaged")
    targets = target_paths(model, config)
    layer_names = {k.rsplit(".", 1)[0] for k in tensors}
    if layer_names != set(targets):
        missing, extra = sorted(set(targets) - layer_names), sorted(layer_names - set(targets))
        raise PatchError(f"adapter {where} does not match {type(model).__name__}: layers missing from the adapter "
                         f"{missing[:5]}, adapter layers not in the model {extra[:5]}; was it trained on this "
                         f"architecture?")
    root = unwrap_model(model)
    E, r = config.num_experts, config.rank
    for key, value in tensors.items():
        name, pname = key.rsplit(".", 1)
        d_out, d_in = root.get_submodule(targets[name]).weight.shape
        expected = {"lora_A": (E, r, d_in), "lora_B": (E, d_out, r), "router": (E, d_in)}.get(pname)
        if expected is None or tuple(value.shape) != expected:
            raise PatchError(f"adapter tensor {key} has shape {tuple(value.shape)}, expected {expected} for this "
                             f"model; the adapter was trained on a different architecture")
    add_loramoe(model, config)
    params = adapter_parameters(model)
    if set(params) != set(tensors):
        raise PatchError(f"adapter {where} tensors {sorted(set(tensors) ^ set(params))[:5]} do not match its config")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key].to(p.dtype))
    return model


def merge_loramoe(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and remove the LoRAMoE layers, in place; returns `model`.

    Possible only where every gate is constant: router="none" (every expert has gate 1; with one
    expert this is plain LoRA) or a single expert (its softmax gate is 1). Then the delta is the fixed
    matrix scale * sum_e B_e A_e. A routed mixture of several experts raises MergeNotPossible (its
    gates depend on each token) before anything changes.
    """
    layers = loramoe_layers(model)
    if not layers:
        raise BadInputError(f"{type(model).__name__} has no LoRAMoE layers to merge")
    for layer in layers.values():
        layer.check_mergeable()
    paths = {path: name for path, module in unwrap_model(model).named_modules()
             for name in [getattr(module, "name", None)] if isinstance(module, LoRAMoELinear)}
    _replace(model, {path: layers[name].merged() for path, name in paths.items()})
    delattr(unwrap_model(model), _CONFIG_ATTR)
    return model
