"""The MoE architecture layer: one interface over every supported transformers MoE family."""

from moe_unlearn.arch.base import ExpertSlice, MoELayer, Routing
from moe_unlearn.arch.capture import ForwardRecord, RouterRecord, RoutingCapture
from moe_unlearn.arch.discovery import find_moe_layers
from moe_unlearn.arch.families import ADAPTERS

__all__ = ["ADAPTERS", "ExpertSlice", "ForwardRecord", "MoELayer", "RouterRecord", "Routing", "RoutingCapture",
           "find_moe_layers"]
