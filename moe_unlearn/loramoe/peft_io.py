"""LoRAMoE adapters to and from PEFT's LoRA format, where the mixture is plain LoRA.

A PEFT LoRA adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` [r, d_in] and `.lora_B.weight` [d_out, r]; its update is
(lora_alpha / r) * B A (lora_alpha / sqrt(r) with use_rslora).

Export works where every gate is constant (the same condition as merging): router="none" with E
experts, whose update scale * sum_e B_e A_e is one LoRA of rank E*r (A's stacked along the rank,
B's side by side, lora_alpha = alpha * E so that lora_alpha / (E*r) = alpha / r), or a single
expert with a router (its softmax gate is 1). A routed mixture of several experts has token-
dependent gates, no LoRA equals it, and export raises MergeNotPossible; the router weights of a
single-expert adapter are dropped (they have no effect).

Import reads plain LoRA on nn.Linear modules into a one-expert, router-free LoRAMoE adapter.
Refused, each with its reason: DoRA, trained biases, modules_to_save, fan_in_fan_out, per-module
rank/alpha patterns, LoRA on embeddings or on raw parameters (target_parameters), and adapters
that cover only part of the linears of a target name (LoRAMoE wraps every linear of that name).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_unlearn.arch.wrappers import unwrap_model
from moe_unlearn.atomic import atomic_dir
from moe_unlearn.errors import BadInputError
from moe_unlearn.loramoe.config import LoRAMoEConfig
from moe_unlearn.loramoe.model import add_loramoe_with_weights, get_loramoe_config, loramoe_layers

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def export_peft(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRAMoE adapter as a PEFT LoRA adapter folder (atomically; replaces one)."""
    config = get_loramoe_config(model)
    layers = loramoe_layers(model)
    for layer in layers.values():
        layer.check_mergeable()
    E, r = config.num_experts, config.rank
    tensors = {}
    for name, layer in layers.items():
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.reshape(E * r, A.shape[-1]).contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.permute(1, 0, 2).reshape(B.shape[1], E * r).contiguous().cpu()
    base = unwrap_model(model)
    name_or_path = base_model_name_or_path or str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": E * r, "lora_alpha": config.alpha * E,
        "target_modules": sorted(layers), "lora_dropout": config.dropout, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "inference_mode": True,
        "base_model_name_or_path": name_or_path,
    }
    path = Path(path)
    with atomic_dir(path, replace=True) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return path


def _refuse(cfg: dict, path: Path) -> None:
    def no(reason: str) -> None:
        raise BadInputError(f"PEFT adapter {path}: {reason}; only plain LoRA on linear layers imports as LoRAMoE")

    if str(cfg.get("peft_type", "")).upper() != "LORA":
        no(f"peft_type is {cfg.get('peft_type')!r}, not LORA")
    if cfg.get("use_dora"):
        no("it is a DoRA adapter (a learned magnitude per output, not a low-rank update)")
    if cfg.get("bias", "none") != "none":
        no(f"it trains biases (bias={cfg['bias']!r})")
    if cfg.get("modules_to_save"):
        no(f"it saves whole modules {cfg['modules_to_save']} beside the LoRA weights")
    if cfg.get("fan_in_fan_out"):
        no("fan_in_fan_out=True (Conv1D-style weights)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        no("it has per-module rank_pattern / alpha_pattern (one rank and alpha per adapter only)")
    if cfg.get("target_parameters"):
        no(f"it puts LoRA on raw parameters {cfg['target_parameters']} (e.g. fused 3-D experts), not on linears")


def import_peft(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the PEFT LoRA adapter at `path` to a stock `model` as a one-expert LoRAMoE without router
    (in place). Every key and shape is checked first, so a refused adapter leaves the model untouched."""
    path = Path(path)
    if not (path / PEFT_CONFIG_FILE).is_file() or not (path / PEFT_WEIGHTS_FILE).is_file():
        raise BadInputError(f"{path} is not a PEFT adapter folder: it needs {PEFT_CONFIG_FILE} and "
                            f"{PEFT_WEIGHTS_FILE}")
    from moe_unlearn.validate import check_int, check_number, read_json_file

    cfg = read_json_file(path / PEFT_CONFIG_FILE, what="PEFT adapter config", error=BadInputError)
    if not isinstance(cfg, dict):
        raise BadInputError(f"{path / PEFT_CONFIG_FILE} does not hold a JSON object")
    _refuse(cfg, path)
    r = check_int(f"{PEFT_CONFIG_FILE} r", cfg.get("r"), low=1)
    alpha = check_number(f"{PEFT_CONFIG_FILE} lora_alpha", cfg.get("lora_alpha"), low=0.0, low_open=True)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors: dict[str, torch.Tensor] = {}
    try:
        stored = load_file(str(path / PEFT_WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error type on a truncated or garbled file
        raise BadInputError(f"cannot read {path / PEFT_WEIGHTS_FILE} ({' '.join(str(exc).split())[:200]}); the "
                            "adapter is damaged") from None
    for key, value in stored.items():
        m = _KEY.match(key)
        if m is None:
            raise BadInputError(f"PEFT adapter {path}: tensor {key!r} is no LoRA A/B weight of a linear layer "
                                f"(embedding LoRA and other tuners do not import)")
        if value.dim() != 2:
            raise BadInputError(f"PEFT adapter {path}: {key} has shape {tuple(value.shape)}, expected 2-D")
        which = "lora_A" if m["which"] == "lora_A" else "lora_B"
        tensors[f"{m['module']}.{which}"] = value.unsqueeze(0)  # [1, r, d_in] / [1, d_out, r]
    targets = sorted({k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in tensors})
    config = LoRAMoEConfig(num_experts=1, rank=r, alpha=scale * r, dropout=float(cfg.get("lora_dropout", 0.0)),
                           target_modules=targets, router="none")
    return add_loramoe_with_weights(model, config, tensors, str(path))


__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "export_peft", "import_peft"]
