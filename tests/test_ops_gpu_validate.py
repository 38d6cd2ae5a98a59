"""benchmarks/gpu_validate.sh dry-runs on the CPU (interpreter, tiny shapes), so the GPU script cannot rot:
every step runs, every file it promises is written, and the checks and benchmark rows it records pass."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = {"env.txt", "build.log", "pytest.log", "checks.json", "checks.log", "bench_ops.json", "bench.log",
         "summary.txt"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash + timeout")
def test_gpu_validate_dry_run(tmp_path):
    out = tmp_path / "gv"
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_validate.sh"), "--dry-run", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files, all of them written
    for name in ("pytest rc=0", "checks rc=0", "bench rc=0", "failed=0", "mode=dry-run"):
        assert name in summary, summary

    checks = json.loads((out / "checks.json").read_text())
    assert checks["tiny"] and checks["failed"] == []
    names = {c["name"] for c in checks["checks"]}
    for kind in ("lora_rank130", "lora_routed_topk", "lora_strided", "lora_poisoned", "lora_several_tiles_per_program",
                 "routing_E64_K8", "routing_unsorted_given", "routing_neg_inf_rows", "routing_poisoned_many_tiles"):
        assert any(n.startswith(kind) for n in names), kind
    assert all(c["ok"] for c in checks["checks"])

    bench = json.loads((out / "bench_ops.json").read_text())
    assert bench["all_ok"] and "triton" in bench["backends"]
    rows = bench["results"]
    kinds = {(r["op"], r["backend"], r["kind"]) for r in rows}
    for want in [("loramoe_delta_fwd", "triton", "kernel"), ("loramoe_delta_fwd", "triton", "e2e"),
                 ("loramoe_delta_fwd", "torch_loop", "e2e"), ("loramoe_delta_fwd_bwd", "triton", "e2e"),
                 ("routing_stats", "triton", "kernel"), ("routing_stats", "torch_softmax_topk_bincount", "e2e")]:
        assert want in kinds, want
    for r in rows:  # bytes and fraction of measured bandwidth on every row, fwd+bwd included
        assert r["bytes"] > 0 and r["bw_fraction"] > 0 and r["median_ms"] > 0 and r["ok"], r
