"""The registry of architecture adapters, one per routing rule / expert layout.

ADAPTERS maps a transformers `config.model_type` to the `MoELayer` subclass that reads
that family. Adding a family = one small subclass (or reuse) + one registry line.

Families checked against transformers 5.23 (tests/test_arch.py runs each tiny model):
mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss, phimoe,
granitemoe, qwen3_next, dbrx; and minimax, flex_olmo, glm4_moe, dots1, hunyuan_v1_moe, ernie4_5_moe.
"""

from __future__ import annotations

from moe_unlearn.arch.base import MoELayer
from moe_unlearn.arch.dbrx import DbrxLayer
from moe_unlearn.arch.deepseek import DeepseekV2Layer, DeepseekV3Layer
from moe_unlearn.arch.fused import FusedGateUpLayer
from moe_unlearn.arch.gpt_oss import GptOssLayer
from moe_unlearn.arch.phimoe import PhimoeLayer
from moe_unlearn.arch.softmax_topk import (
    ErnieMoeLayer,
    HunyuanMoeLayer,
    LogitTopKLayer,
    MixtralLayer,
    SoftmaxTopKLayer,
)

# model_type -> adapter class
ADAPTERS: dict[str, type[MoELayer]] = {
    "mixtral": MixtralLayer,
    "qwen2_moe": SoftmaxTopKLayer,
    "qwen3_moe": SoftmaxTopKLayer,
    "olmoe": SoftmaxTopKLayer,
    "qwen3_next": SoftmaxTopKLayer,
    "deepseek_v2": DeepseekV2Layer,
    "deepseek_v3": DeepseekV3Layer,
    "gpt_oss": GptOssLayer,
    "phimoe": PhimoeLayer,
    "granitemoe": LogitTopKLayer,
    "dbrx": DbrxLayer,
    # same routing code as a family above (checked line by line against transformers 5.23)
    "minimax": MixtralLayer,
    "flex_olmo": SoftmaxTopKLayer,
    "glm4_moe": DeepseekV3Layer,
    "dots1": DeepseekV3Layer,
    "hunyuan_v1_moe": HunyuanMoeLayer,
    "ernie4_5_moe": ErnieMoeLayer,
}

# MoE families seen in transformers 5.23 but without an adapter, and why (shown in UnsupportedFamily errors)
NOT_SUPPORTED: dict[str, str] = {
    "granitemoeshared": "its shared MLP hangs off the decoder layer, outside the MoE block, which the "
                        "MoELayer interface does not model yet",
    "granitemoehybrid": "its shared MLP hangs off the decoder layer, outside the MoE block, which the "
                        "MoELayer interface does not model yet",
}

__all__ = ["NOT_SUPPORTED", "ADAPTERS", "DbrxLayer", "DeepseekV2Layer", "DeepseekV3Layer", "ErnieMoeLayer", "FusedGateUpLayer", "GptOssLayer",
           "HunyuanMoeLayer", "LogitTopKLayer", "MixtralLayer", "PhimoeLayer", "SoftmaxTopKLayer"]
