"""Routing recomputation on a CUDA device in bf16 (grouped_mm experts, GPU matmuls): the
adapter must still reproduce exactly what the model routes. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from moe_unlearn.arch import RoutingCapture, find_moe_layers
from moe_unlearn.testing import TINY_FAMILIES, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_route_equals_what_the_model_routes_on_cuda_bf16(family):
    try:
        model = tiny_model(family).to("cuda", torch.bfloat16)
    except (KeyError, ValueError) as exc:  # the GPU machine may run an older transformers
        pytest.skip(f"{family} does not build with this transformers: {exc}")
    layers = find_moe_layers(model)
    seen = {}

    def spy(idx):
        def hook(module, args, kwargs):
            vals = list(args) + list(kwargs.values())
            seen[idx] = (vals[1].clone(), vals[2].clone())
        return hook

    handles = [lay.experts.register_forward_pre_hook(spy(lay.layer_idx), with_kwargs=True) for lay in layers]
    ids = torch.randint(3, 128, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    try:
        with RoutingCapture(model, layers, hidden_states=True) as cap, torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for lay in layers:
        with torch.no_grad():
            routing = lay.route(cap.last.layers[lay.layer_idx].hidden)
        idx, weight = seen[lay.layer_idx]
        assert torch.equal(routing.topk_idx, idx)
        assert torch.equal(routing.topk_weight, weight.float())
