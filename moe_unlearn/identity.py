"""Hashes that identify models, tensors and data: what a patch, an attribution or a checkpoint
records to refuse being used with another model, other values or other data.

It sits below both `attribution` and `unlearning` (it imports neither), so each can record and
check identities without reaching into the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from moe_unlearn.arch.wrappers import unwrap_model

# config keys that do not change what the weights mean
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "name_or_path", "_name_or_path", "torch_dtype", "dtype",
                                  "output_router_logits", "use_cache", "architectures", "output_hidden_states",
                                  "output_attentions", "return_dict"})


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of the raw bytes (dtype and shape included), for bit-exact identity checks."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_hash(model: nn.Module) -> str:
    """Hash of the model config without keys that do not change what the weights mean."""
    cfg = getattr(unwrap_model(model), "config", None)
    d = cfg.to_dict() if cfg is not None else {}
    d = {k: v for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model: nn.Module) -> dict[str, str]:
    """Name, model type and config hash of a model (a patch's or an attribution's base model)."""
    model = unwrap_model(model)
    cfg = getattr(model, "config", None)
    return {"name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "")),
            "model_type": str(getattr(cfg, "model_type", type(model).__name__)),
            "config_hash": config_hash(model)}


def batches_hash(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """sha256 of the token ids, masks and labels of every batch (which data a checkpoint was trained on)."""
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            t = b[key].detach().cpu().contiguous()
            h.update(f"{key}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


__all__ = ["VOLATILE_CONFIG_KEYS", "batches_hash", "config_hash", "model_identity", "tensor_hash"]
