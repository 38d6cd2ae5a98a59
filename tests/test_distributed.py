"""Data parallel (torchrun, gloo on the CPU) gives the patch of one process on the union of the data;
wrappers are looked through; sharded parameters are refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _dp_worker
import pytest
import torch
from _tiny_tokenizer import word_tokenizer
from safetensors.torch import load_file
from torch import nn

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.arch.discovery import model_type, unwrap_model
from moe_unlearn.distributed import RankShard
from moe_unlearn.errors import BadInputError
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_torchrun_two_ranks_match_one_process(tmp_path, adapter):
    single = tmp_path / "single"
    _dp_worker.main(str(single), grad_accum=2, adapter=adapter)  # one process, 2 micro-batches per step
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    dp = tmp_path / "dp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "_dp_worker.py"), str(dp), "1", *([adapter] if adapter else [])],
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(single / "patch.safetensors")), load_file(str(dp / "patch.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.startswith("a.") for k in a) == (adapter is not None)  # low-rank factors, all-reduced
    for k in a:
        if k.startswith("fix_"):  # revert corrections depend on the last bits of the factors (checked by hash)
            continue
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    ma, mb = (json.loads((d / "patch.json").read_text()) for d in (single, dp))
    assert ma["targets"] == mb["targets"]  # the attribution of the union, all-reduced
    assert [e["name"] for e in ma["entries"]] == [e["name"] for e in mb["entries"]]
    ha, hb = (json.loads(Path(f"{d}.history.json").read_text()) for d in (single, dp))
    for k in ha:  # logged terms: the mean over the ranks = the mean over the micro-batches
        assert ha[k] == pytest.approx(hb[k], rel=1e-5, abs=1e-6), k
    r0, r1 = (torch.load(f"{dp}.rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0[n], r1[n]) for n in r0)  # every rank ends with the same weights (and statistics)
    one = torch.load(f"{single}.rank0.pt")
    for k in ("att.affinity", "att.frequency", "att.mean_score", "att.stability"):  # all-reduced sums
        assert torch.allclose(one[k], r0[k], atol=1e-6), k
    assert torch.equal(one["att.counts"], r0["att.counts"]) and torch.equal(one["att.tokens"], r0["att.tokens"])


def test_rank_shard_is_equal_and_interleaved():
    shard = [RankShard(list(range(7)), r, 2) for r in (0, 1)]
    assert shard[0](0) == [0, 2, 4] and shard[1](0) == [1, 3, 5] and shard[0].dropped == 1
    with pytest.raises(BadInputError, match="at least 3 forget batches"):
        RankShard([0, 1], 0, 3)


class _Wrapper(nn.Module):  # what DDP / DeepSpeed look like to us: the model under .module
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_wrapped_model_is_unwrapped():
    model = tiny_model("qwen3_moe")
    wrapped = _Wrapper(_Wrapper(model))
    assert unwrap_model(wrapped) is model and model_type(wrapped) == "qwen3_moe"
    assert [m.layer_idx for m in find_moe_layers(wrapped)] == [m.layer_idx for m in find_moe_layers(model)]
    before = model.model.layers[1].mlp.gate.weight.clone()
    res = unlearn(wrapped, ["w1 w2 w3 w4", "w5 w6 w7"], tokenizer=word_tokenizer(), method="ga", target="1:0",
                  steps=1, lr=1e-2, batch_size=2, max_length=8, progress=False)
    assert res.targets == ["1:0"] and not torch.equal(before, model.model.layers[1].mlp.gate.weight)


def test_zero3_partitioned_parameters_are_refused_before_any_work():
    model = tiny_model("qwen3_moe")
    p = model.model.layers[1].mlp.experts.gate_up_proj
    p.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter (its data is an empty placeholder)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    with pytest.raises(BadInputError, match="DeepSpeed ZeRO-3"):
        unlearn(model, ["w1 w2 w3"], tokenizer=word_tokenizer(), method="ga", target="1:0", steps=1,
                progress=False)
    assert all(torch.equal(before[n], q) for n, q in model.named_parameters())


def test_fsdp2_sharded_model_refused_by_unlearn_attributed_as_whole(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_model("qwen3_moe")
        fully_shard(model)
        with pytest.raises(BadInputError, match="sharded too"):  # accepted only with the trained tensors whole
            unlearn(model, ["w1 w2 w3"], tokenizer=word_tokenizer(), method="ga", target="1:0", steps=1,
                    prefix_cache=False, progress=False)
        from moe_unlearn.attribution import attribute_experts

        # attribution reads routing only: a sharded model is attributed as the whole one
        got = attribute_experts(model, ["w1 w2 w3"], tokenizer=word_tokenizer(), progress=False)
        want = attribute_experts(tiny_model("qwen3_moe"), ["w1 w2 w3"], tokenizer=word_tokenizer(), progress=False)
        assert torch.equal(got.counts, want.counts) and torch.allclose(got.affinity, want.affinity)
    finally:
        dist.destroy_process_group()
