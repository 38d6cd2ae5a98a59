"""FSDP2 sharded unlearning (torchrun, gloo on the CPU): the patch is bit-identical to one process with the
equivalent accumulation, each rank stores its share plus the trained block only; attribution and evaluation of a
sharded model equal one process; launcher and input refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _fsdp_worker
import pytest
import torch
from _tiny_tokenizer import word_tokenizer
from safetensors.torch import load_file

from moe_unlearn.errors import BadInputError
from moe_unlearn.memory import estimate
from moe_unlearn.sharding import check_launch, shard_from_launcher
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fsdp2", "fsdp2_nocache", "user", "loaded")
# ranks of the torchrun test: 2 (the CI machine has two cores); MOE_UNLEARN_TEST_RANKS=4 runs it with 4 (where
# the exact comparisons of trained results are expected to fail: 4 gradients all-reduced sum in another order)
RANKS = int(os.environ.get("MOE_UNLEARN_TEST_RANKS", "2"))
TRAINED = _fsdp_worker.TRAINED


def _clean_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP",
              "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    return env


def test_fsdp2_two_ranks_bit_identical_to_one_process(tmp_path, bench_cache):
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1): CPU matmuls sum in a per-thread order
    try:
        _fsdp_worker.run(str(single), grad_accum=RANKS)  # one process, no sharding, a micro-batch per rank a step
        _fsdp_worker.attribution(str(tmp_path / "attr_single.pt"))
        _fsdp_worker.evaluation(str(tmp_path / "eval_single.json"))
        _fsdp_worker.save_inputs(str(tmp_path))
        for command in ("attribute", "evaluate"):  # the commands in one process: what --shard fsdp2 must equal
            _fsdp_worker.cli(str(tmp_path), command, str(tmp_path / f"cli_single_{command}"), shard=False)
        _fsdp_worker.frontier(str(bench_cache), str(tmp_path / "frontier_single"), shard=False, grad_accum=RANKS)
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
                           str(ROOT / "tests" / "_fsdp_worker.py"), str(tmp_path), "1",
                           ",".join(MODES + ("attr", "eval_fsdp2", "cli_unlearn", "cli_attribute", "cli_evaluate", "frontier")),
                           str(bench_cache)],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "attr_single.pt")
    for rank in range(RANKS):  # attribution of a sharded model, split over the ranks or not: the one-process values
        got = torch.load(tmp_path / f"attr.rank{rank}.pt")
        assert got.keys() == one.keys()
        for k in one:
            exact = k.endswith(("counts", "tokens", "top"))
            assert torch.equal(got[k], one[k]) if exact else torch.allclose(got[k], one[k], atol=1e-6), (rank, k)
    ev = json.loads((tmp_path / "eval_single.json").read_text())
    for rank in range(RANKS):  # evaluate() of a sharded model (every rank runs all of it): the one-process report
        got = json.loads((tmp_path / f"eval_fsdp2.rank{rank}.json").read_text())
        for report in (got, ev):
            report.pop("meta", None)  # the model's class name (FSDP's) and the wall time
        assert got == ev, rank
    # the commands with --shard fsdp2: the one-process files (rank 0 wrote them)
    got, one = (json.loads((tmp_path / d / "attribution.json").read_text())
                for d in ("cli_attribute", "cli_single_attribute"))
    assert got.keys() == one.keys() and got["target"] == one["target"] and got["counts"] == one["counts"]
    for k in ("affinity", "frequency", "mean_score"):  # sums of each rank's share, all-reduced
        assert torch.allclose(torch.tensor(got[k]), torch.tensor(one[k]), atol=1e-6), k
    got, one = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("cli_evaluate", "cli_single_evaluate"))
    for report in (got, one):
        report["meta"].pop("seconds")
        report["meta"].pop("model")  # the class name (FSDP's when sharded)
    assert got == one and got["meta"]["before_patch"] and got["routing"]
    got, one = (json.loads((tmp_path / d / "frontier_natural_quick.json").read_text())
                for d in ("frontier", "frontier_single"))  # sharded over N ranks = one process with grad_accum N
    for res in (got, one):
        for r in res["runs"]:
            r.pop("seconds")
    assert got == one and len(got["runs"]) == 2 and got["protocol"]["micro_batches_per_step"] == RANKS
    ref = load_file(str(single / "patch.safetensors"))
    model = tiny_model("qwen3_moe")
    params = dict(model.named_parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(params[n].numel() * params[n].element_size() for n in TRAINED)
    plan = estimate(model, [(1, 2)], world_size=RANKS, shard="fsdp2")
    assert plan.trained_block == block
    for mode in (*MODES, "cli_unlearn"):
        got = load_file(str(tmp_path / mode / "patch.safetensors"))
        assert got.keys() == ref.keys(), mode
        for k in ref:  # sharding changes where weights live, not one bit of the result
            assert torch.equal(got[k], ref[k]), (mode, k)
        for rank in range(RANKS) if mode in MODES else ():
            rep = torch.load(tmp_path / f"{mode}.rank{rank}.pt")
            assert sorted(rep["whole_names"]) == sorted(TRAINED), (mode, rank)  # everything else sharded
            assert rep["whole"] == block and rep["total"] == total
            assert rep["local"] == rep["share"] + block, (mode, rank)  # its share plus the trained block
            assert rep["peak"] <= rep["share"] + block, (mode, rank)  # after every backward and step too
            assert rep["share"] <= (total - block) // RANKS + 1024, (mode, rank)  # ~1/RANKS (dim-0 padding aside)
            assert rep["local"] <= plan.weights and (rank or rep["local"] == plan.weights)  # what --plan computes
            if mode == "loaded":  # read from the files: this rank's rows and the trained block, nothing else
                assert rep["bytes_read"] == rep["share"] + block < rep["checkpoint_bytes"], rank


def test_fsdp2_without_process_group_is_refused():
    with pytest.raises(BadInputError, match="torchrun"):
        unlearn(tiny_model("qwen3_moe"), ["w1 w2 w3"], tokenizer=word_tokenizer(), method="ga", target="1:0", steps=1,
                shard="fsdp2", progress=False)


def test_user_sharded_trained_tensors_are_refused_unchanged(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_model("qwen3_moe")
        for layer in model.model.layers:
            fully_shard(layer)  # the target layer's experts sharded too: its slices are not whole on a rank
        fully_shard(model)
        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        with pytest.raises(BadInputError, match="ignored_params"):
            unlearn(model, ["w1 w2 w3", "w4 w5"], tokenizer=word_tokenizer(), method="ga", target="1:0", steps=1,
                    progress=False)
        assert all(torch.equal(before[n], p.full_tensor()) for n, p in model.named_parameters())
    finally:
        dist.destroy_process_group()


def test_accelerate_launcher_configs():
    assert shard_from_launcher({"ACCELERATE_USE_FSDP": "true"}) == "fsdp2"
    assert shard_from_launcher({"ACCELERATE_USE_FSDP": "false"}) is None and shard_from_launcher({}) is None
    with pytest.raises(BadInputError, match="--shard fsdp2"):
        shard_from_launcher({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_FSDP": "false"})
    with pytest.raises(BadInputError, match="ZeRO-3"):
        shard_from_launcher({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert shard_from_launcher({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) is None
    with pytest.raises(BadInputError, match="--device-map cannot be combined with 2 processes"):
        check_launch(None, "auto", 2)
    with pytest.raises(BadInputError, match="torchrun"):
        check_launch("fsdp2", None, 1)
    check_launch("fsdp2", None, 2)
    check_launch(None, "auto", 1)


@pytest.mark.parametrize("env, flags, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed"),
    ({"WORLD_SIZE": "2"}, ["--device-map", "auto"], "--device-map cannot be combined"),
    ({}, ["--shard", "fsdp2"], "torchrun"),
    ({}, ["--shard", "fsdp2", "--merge"], "merge"),
])
def test_cli_refuses_bad_launches_before_loading(tmp_path, env, flags, message):
    mdir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(mdir)
    word_tokenizer().save_pretrained(mdir)
    (tmp_path / "f.txt").write_text("w1 w2 w3\nw4 w5 w6\n")
    proc = subprocess.run([sys.executable, "-m", "moe_unlearn.cli", "unlearn", "--model", str(mdir), "--forget",
                           str(tmp_path / "f.txt"), "--target", "1:0", "--out", str(tmp_path / "out"), *flags],
                          cwd=ROOT, env={**_clean_env(), **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_sharded_unlearn_without_targets_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    from moe_unlearn.cli import main

    mdir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(mdir)
    word_tokenizer().save_pretrained(mdir)
    (tmp_path / "f.txt").write_text("w1 w2 w3\nw4 w5 w6\n")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun: no process group may start before the refusal
    assert main(["unlearn", "--model", str(mdir), "--forget", str(tmp_path / "f.txt"), "--shard", "fsdp2", "--out",
                 str(tmp_path / "out")]) == 2
    assert "--target L:E or --attribution" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["attribute", "evaluate"])
def test_sharded_commands_refuse_one_process_before_loading(tmp_path, monkeypatch, capsys, command):
    from moe_unlearn.cli import main

    _fsdp_worker.save_inputs(str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = (["--data", str(tmp_path / "forget.txt")] if command == "attribute" else
            ["--forget", str(tmp_path / "qa_forget.jsonl"), "--retain", str(tmp_path / "qa_retain.jsonl")])
    assert main([command, "--model", str(tmp_path / "model"), *data, "--shard", "fsdp2", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
