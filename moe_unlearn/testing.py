"""Tiny random-init models of each MoE family, for tests and examples (no hub access needed)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

# Common tiny sizes; each family's builder adds what its config needs.
_BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _qwen3_moe() -> dict:
    return dict(model_type="qwen3_moe", moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                norm_topk_prob=True, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[])


# family name -> function returning config kwargs (model_type included)
TINY_FAMILIES = {
    "qwen3_moe": _qwen3_moe,
}


def tiny_config(family: str, **overrides):
    if family not in TINY_FAMILIES:
        raise KeyError(f"no tiny config for {family!r}; known: {sorted(TINY_FAMILIES)}")
    kwargs = {**_BASE, **TINY_FAMILIES[family](), **overrides}
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A random-init tiny causal LM of `family` in eval mode, fp32, deterministic for `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()
