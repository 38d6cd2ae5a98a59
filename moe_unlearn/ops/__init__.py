"""Ops with several backends (CUDA extension, Triton, torch). The torch paths are the ground truth.

Backend dispatch is added by the kernels work (moe_unlearn/ops/dispatch.py); until then
these names point at the torch references.
"""

from moe_unlearn.ops.loramoe_delta import dense_gates, loramoe_delta_loop, loramoe_delta_torch
from moe_unlearn.ops.routing_stats import RoutingStats, routing_stats_torch

routing_stats = routing_stats_torch
loramoe_delta = loramoe_delta_torch

__all__ = ["RoutingStats", "dense_gates", "loramoe_delta", "loramoe_delta_loop", "loramoe_delta_torch",
           "routing_stats", "routing_stats_torch"]
