"""Injecting LoRAMoE into a transformers model, and saving / loading the adapter.

An adapter on disk is a folder with two files: `adapter.safetensors` (LoRA experts and
routers only, keyed by the wrapped module's name) and `loramoe_config.json`. It loads onto
an unmodified model of the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_unlearn.atomic import atomic_dir
from moe_unlearn.errors import BadInputError, PatchError
from moe_unlearn.loramoe.config import ATTENTION_TARGETS, LoRAMoEConfig
from moe_unlearn.loramoe.layer import LoRAMoELinear

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "loramoe_config.json"
_CONFIG_ATTR = "_loramoe_config"
_ADAPTER_PARAMS = ("lora_A", "lora_B", "router")


def find_targets(model: nn.Module, config: LoRAMoEConfig) -> list[str]:
    """Names of the nn.Linear modules `add_loramoe` would wrap (lm_head never)."""
    wanted = set(config.target_modules)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted and name != "lm_head"]


def add_loramoe(model: nn.Module, config: LoRAMoEConfig) -> nn.Module:
    """Wrap every target nn.Linear of `model` in a LoRAMoELinear, in place, and freeze the rest.

    Afterwards only the LoRA experts and routers have requires_grad=True. Returns `model`.
    """
    if loramoe_layers(model):
        raise BadInputError("this model already has LoRAMoE layers; load or add an adapter only once")
    targets = find_targets(model, config)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise BadInputError(
            f"no nn.Linear named {config.target_modules} in {type(model).__name__}. Routed experts of MoE models "
            f"are fused 3-D parameters, not nn.Linear, so only dense MLPs, shared experts and attention "
            f"projections can be targets; this model's linear layers are named {linear} (attention: "
            f"target_modules={list(ATTENTION_TARGETS)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRAMoELinear(getattr(parent, child), config, name=name))
    setattr(model, _CONFIG_ATTR, config)
    return model


def loramoe_layers(model: nn.Module) -> dict[str, LoRAMoELinear]:
    """The model's LoRAMoE layers by the name of the linear they wrap."""
    return {m.name: m for m in model.modules() if isinstance(m, LoRAMoELinear)}


def get_loramoe_config(model: nn.Module) -> LoRAMoEConfig:
    config = getattr(model, _CONFIG_ATTR, None)
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
    config = LoRAMoEConfig.load(path / CONFIG_FILE)
    try:
        tensors = load_file(str(path / ADAPTER_FILE))
    except Exception as exc:  # safetensors raises its own error type on a truncated or garbled file
        raise PatchError(f"cannot read {path / ADAPTER_FILE} ({' '.join(str(exc).split())[:200]}); the adapter "
                         "is damaged") from None
    bad = [k for k, v in tensors.items() if "." not in k or (v.is_floating_point() and not bool(v.isfinite().all()))]
    if bad:
        raise PatchError(f"adapter {path}: tensors {bad[:3]} are misnamed or hold NaN/inf; the adapter is damaged")
    targets = set(find_targets(model, config))
    layer_names = {k.rsplit(".", 1)[0] for k in tensors}
    if layer_names != targets:
        missing, extra = sorted(targets - layer_names), sorted(layer_names - targets)
        raise PatchError(f"adapter {path} does not match {type(model).__name__}: layers missing from the adapter "
                         f"{missing[:5]}, adapter layers not in the model {extra[:5]}; was it trained on this "
                         f"architecture?")
    modules = dict(model.named_modules())
    E, r = config.num_experts, config.rank
    for key, value in tensors.items():
        name, pname = key.rsplit(".", 1)
        d_out, d_in = modules[name].weight.shape
        expected = {"lora_A": (E, r, d_in), "lora_B": (E, d_out, r), "router": (E, d_in)}.get(pname)
        if expected is None or tuple(value.shape) != expected:
            raise PatchError(f"adapter tensor {key} has shape {tuple(value.shape)}, expected {expected} for this "
                             f"model; the adapter was trained on a different architecture")
    add_loramoe(model, config)
    params = adapter_parameters(model)
    if set(params) != set(tensors):
        raise PatchError(f"adapter {path} tensors {sorted(set(tensors) ^ set(params))[:5]} do not match its config")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key].to(p.dtype))
    return model


def merge_loramoe(model: nn.Module) -> nn.Module:
    """Always raises MergeNotPossible: token-dependent mixtures have no static-weight equivalent."""
    layers = loramoe_layers(model)
    if not layers:
        raise BadInputError(f"{type(model).__name__} has no LoRAMoE layers to merge")
    next(iter(layers.values())).merge()
    return model  # not reached
