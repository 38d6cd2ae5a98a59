"""`--plan`: the per-rank memory computed from a config (meta device) equals the bytes counted on the real
model: its parameters, their FSDP2 shares, the trained leaves the engine builds and their optimizer state."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.memory import estimate, meta_model
from moe_unlearn.testing import tiny_config, tiny_model
from moe_unlearn.training import TrainConfig, TrainHooks, train
from moe_unlearn.unlearning.scopes import SliceParams

ROOT = Path(__file__).resolve().parents[1]


def _counted(model, layer_idx, expert, world):
    """The same parts, counted on a real model by other means than moe_unlearn.memory."""
    layer = {m.layer_idx: m for m in find_moe_layers(model)}[layer_idx]
    slices = layer.expert_slices(expert)
    router = layer.router_parameters()
    keep = {id(s.param) for s in slices} | {id(p) for _, p in router}
    nbytes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    block = sum(nbytes[n] for n, p in model.named_parameters() if id(p) in keep)
    share = sum(math.ceil(p.shape[0] / world) * p[0].numel() * p.element_size() if p.dim() > 1
                else math.ceil(p.shape[0] / world) * p.element_size()
                for p in model.parameters() if id(p) not in keep)
    units = [*model.model.layers, model.model.embed_tokens, model.model.norm, model.lm_head]
    gathered = max(sum(p.numel() * p.element_size() for p in u.parameters() if id(p) not in keep) for u in units)
    trained = SliceParams(slices, router)  # the leaves the engine trains
    leaves = sum(p.numel() * p.element_size() for p in trained.shadows) + sum(
        m.numel() * m.element_size() for _, m in trained.masters)
    # AdamW's state, measured: one step on the leaves (the model's own tensors where they train in place)
    opt_bytes = {}
    train(trained.leaves, lambda _: {"loss": sum((p.float() ** 2).sum() for p in trained.leaves)}, [0],
          TrainConfig(steps=1, lr=1e-3, progress=False), hooks=[_OptBytes(opt_bytes)])
    trained.close()
    fused = sum(p.numel() * p.element_size() for p in {id(s.param): s.param for s in slices}.values())
    fused += sum(p.numel() * p.element_size() for _, p in router)
    return dict(weights=share + block, block=block, gathered=2 * gathered, leaves=2 * leaves, fused=fused,
                optimizer=opt_bytes["state"], total=sum(nbytes.values()))


class _OptBytes(TrainHooks):
    def __init__(self, out):
        self.out = out

    def on_train_start(self, optimizer):
        self.optimizer = optimizer

    def after_step(self, step):
        self.out["state"] = sum(v.numel() * v.element_size() for st in self.optimizer.state.values()
                                for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("family, target, dtype", [("qwen3_moe", (1, 2), torch.float32),
                                                   ("mixtral", (0, 1), torch.bfloat16),
                                                   ("qwen2_moe", (2, 5), torch.bfloat16)])
@pytest.mark.parametrize("world", [2, 3])
def test_plan_equals_counted_bytes(family, target, dtype, world):
    real = tiny_model(family).to(dtype)
    plan = estimate(meta_model(tiny_config(family), dtype), [target], world_size=world, shard="fsdp2")
    want = _counted(real, *target, world)
    assert plan.total_params == sum(p.numel() for p in real.parameters())
    assert (plan.weights, plan.trained_block, plan.gathered) == (want["weights"], want["block"], want["gathered"])
    assert (plan.trained_leaves, plan.fused_gradient, plan.optimizer) == (want["leaves"], want["fused"],
                                                                            want["optimizer"])
    whole = estimate(real, [target], world_size=world)  # no sharding: the whole model on every rank
    assert whole.weights == want["total"] and whole.gathered == 0
    assert plan.total == plan.weights + plan.gathered + plan.trained_leaves + plan.fused_gradient + plan.optimizer


def test_plan_cli_reads_only_the_config(tmp_path):
    tiny_config("qwen3_moe").save_pretrained(tmp_path)  # config.json only: no weights, no tokenizer
    proc = subprocess.run([sys.executable, "-m", "moe_unlearn.cli", "unlearn", "--plan", "--model", str(tmp_path),
                           "--shard", "fsdp2", "--nproc", "2", "--target", "1:2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = estimate(meta_model(tiny_config("qwen3_moe")), [(1, 2)], world_size=2, shard="fsdp2")
    assert f"{plan.total / 1e9:9.2f} GB" in proc.stdout and "not measured" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "moe_unlearn.cli", "unlearn", "--plan", "--model", str(tmp_path),
                          "--shard", "fsdp2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--nproc" in bad.stderr and "Traceback" not in bad.stderr
