"""Ops with several backends (CUDA extension, Triton, torch). The torch paths are the ground truth.

`routing_stats` and `loramoe_delta` validate their inputs and dispatch per call
(moe_unlearn/ops/dispatch.py): backend= kwarg, else $MOE_UNLEARN_BACKEND, else automatic
(CUDA tensors: compiled backends; CPU tensors: torch).
"""

from moe_unlearn.ops.api import loramoe_delta, routing_stats
from moe_unlearn.ops.dispatch import BACKENDS, choose_backend
from moe_unlearn.ops.loramoe_delta import dense_gates, loramoe_delta_loop, loramoe_delta_torch
from moe_unlearn.ops.routing_stats import RoutingStats, routing_stats_torch

__all__ = ["BACKENDS", "RoutingStats", "choose_backend", "dense_gates", "loramoe_delta", "loramoe_delta_loop",
           "loramoe_delta_torch", "routing_stats", "routing_stats_torch"]
