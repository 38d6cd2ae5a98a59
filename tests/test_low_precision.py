"""fp32 master copies: a bf16 model accumulates updates smaller than bf16's resolution."""

from __future__ import annotations

import torch
from _tiny_tokenizer import word_tokenizer
from torch import nn

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.arch.base import ExpertSlice
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainConfig, train
from moe_unlearn.unlearning import SliceParams, unlearn

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(10)) for i in range(6)]


def test_sub_resolution_updates_accumulate_in_fp32_masters():
    # bf16 steps near 1.0 are 2**-8 below it; Adam moves each element by lr = 5e-4 per step, a
    # quarter of the half-step, so without masters every update rounds back to 1.0
    fused = nn.Parameter(torch.ones(3, 4, 5, dtype=torch.bfloat16))
    router = nn.Parameter(torch.ones(6, dtype=torch.bfloat16))
    sl = ExpertSlice("w", fused, dim=0, start=1, stop=2, role="gate_up")
    sp = SliceParams([sl], [("router", router)])
    assert all(leaf.dtype == torch.float32 for leaf in sp.leaves) and len(sp.leaves) == 2
    steps, lr = 10, 5e-4
    try:
        train(sp.leaves, lambda _: {"loss": fused.float().sum() + router.float().sum()}, [0] * steps,
              TrainConfig(steps=steps, lr=lr, max_grad_norm=None, progress=False), hooks=[sp])
    finally:
        sp.close()
    master = sp.shadows[0]
    assert torch.allclose(master, torch.full_like(master, 1 - steps * lr), atol=1e-6)
    assert torch.equal(fused[1:2], master.to(torch.bfloat16))  # the model holds the rounded master
    assert torch.equal(fused[1], torch.full_like(fused[1], 1 - 2**-8))
    assert torch.equal(fused[0], torch.ones_like(fused[0])) and torch.equal(fused[2], torch.ones_like(fused[2]))
    assert torch.equal(router, torch.full_like(router, 1 - 2**-8))
    assert fused.grad is None and router.grad is None  # the model-sized gradients are dropped


def test_fp32_whole_tensors_train_in_place():
    p = nn.Parameter(torch.ones(4))
    sp = SliceParams([], [("p", p)])
    assert sp.leaves == [p] and not sp.masters
    sp.close()


def test_bf16_unlearning_changes_the_whole_target_expert():
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    layer = find_moe_layers(model)[-1]
    before = {s.name: s.view().clone() for s in layer.expert_slices(1)}
    res = unlearn(model, FORGET, method="ga", scope="uoe", target=f"{layer.layer_idx}:1", steps=8, lr=2e-4,
                  tokenizer=TOK, batch_size=3, max_length=16, progress=False, prefix_cache=False)
    changed = sum(int((s.view() != before[s.name]).sum()) for s in layer.expert_slices(1))
    total = sum(s.numel for s in layer.expert_slices(1))
    assert changed / total > 0.9, changed / total
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # Adam moments are fp32 for the one expert + router, not bf16 and not all experts
    router = sum(p.numel() for _, p in layer.router_parameters())
    assert res.optimizer_state_bytes == 8 * (total + router) + 4 * (len(before) + len(layer.router_parameters()))
