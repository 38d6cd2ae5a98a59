"""The MoE architecture layer: one interface over every supported transformers MoE family."""

from moe_unlearn.arch.base import ExpertSlice, MoELayer, Routing
from moe_unlearn.arch.capture import ForwardRecord, RouterRecord, RoutingCapture
from moe_unlearn.arch.discovery import adapter_for, find_moe_layers
from moe_unlearn.arch.families import ADAPTERS
from moe_unlearn.arch.summary import model_summary
from moe_unlearn.arch.target import SHARED, ExpertTarget
from moe_unlearn.arch.wrappers import canonical_name, canonical_parameters, unwrap_model

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(ADAPTERS))

__all__ = ["ADAPTERS", "SHARED", "SUPPORTED_FAMILIES", "ExpertSlice", "ExpertTarget", "ForwardRecord", "MoELayer", "RouterRecord", "Routing",
           "RoutingCapture", "adapter_for", "canonical_name", "canonical_parameters", "find_moe_layers", "model_summary",
           "unwrap_model"]
