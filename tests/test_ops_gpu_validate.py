"""benchmarks/gpu_validate.sh run end to end on the CPU in the GPU machine's offline conditions (no package
index, no network, the checkout importable from PYTHONPATH alone), in its dry-run mode: every step, file and
row of the GPU run, with the kernels launched through the interpreter at tiny shapes.

The suite runs the dry run with GV_DRY_PARALLEL=1 (install, checks and bench side by side on the 2 cores):
the same steps, files, rows and assertions. The sequential emulation, in the GPU run's order, is
`test_gpu_validate_dry_run_sequential`, off by default (MOE_UNLEARN_FULL_EMULATION=1 runs it), or the script
itself: `benchmarks/gpu_validate.sh --dry-run OUT_DIR`."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_validate.sh"
FILES = {"env.txt", "install.log", "checks.json", "checks.log", "bench_ops.json", "bench.log", "summary.txt"}
needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash + timeout")


def offline_env(**extra) -> dict:
    """The GPU machine's conditions: no index (pip must not reach one), no network (proxies point nowhere),
    and no installed moe_unlearn to fall back on (only what the script puts on PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    dead = "http://127.0.0.1:9"
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_INDEX_URL=f"{dead}/simple",
               PIP_FIND_LINKS="", HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead,
               NO_PROXY="", no_proxy="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


@needs_shell
def test_gpu_validate_dry_run_end_to_end(tmp_path):
    dry_run_and_check(tmp_path, parallel=True)


@needs_shell
@pytest.mark.skipif(os.environ.get("MOE_UNLEARN_FULL_EMULATION") != "1",
                    reason="the sequential emulation; set MOE_UNLEARN_FULL_EMULATION=1 to run it")
def test_gpu_validate_dry_run_sequential(tmp_path):
    dry_run_and_check(tmp_path, parallel=False)


def dry_run_and_check(tmp_path, parallel: bool):
    out = tmp_path / "gv"
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=tmp_path,
                          env=offline_env(TRITON_INTERPRET="1", GV_DRY_PARALLEL="1" if parallel else "0"),
                          capture_output=True, text=True, timeout=1500)
    wall = time.perf_counter() - t0
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES, summary  # everything under the folder given, nothing else
    steps = {name: (int(sec), int(lim), int(gpu)) for name, sec, lim, gpu in
             re.findall(r"^(\w+) rc=0 seconds=(\d+) limit=(\d+) gpu_limit=(\d+)$", summary, re.M)}
    assert set(steps) == {"preflight", "install", "checks", "bench"}, summary
    assert sum(gpu for _, _, gpu in steps.values()) <= 480, summary  # the GPU run fits one 10-minute command
    assert all(sec <= lim for sec, lim, _ in steps.values()), summary
    assert "mode=dry-run" in summary and "failed=0" in summary
    print(f"gpu_validate.sh --dry-run ({'parallel' if parallel else 'sequential'}) wall time: {wall:.0f} s")

    env_txt = (out / "env.txt").read_text()
    for want in ("torch", "triton", "numpy", "transformers", "checks (", "bench loramoe_delta", "step checks: limit",
                 "GPU step limits sum to 465 s"):
        assert want in env_txt, want
    install = (out / "install.log").read_text()
    assert "install=pip-dry-run" in install and "imports ok from" in install, install[-2000:]
    assert str(ROOT / "moe_unlearn") in install  # the checkout, importable without an install

    checks = json.loads((out / "checks.json").read_text())
    assert checks["tiny"] and checks["complete"] and checks["failed"] == [] and checks["skipped"] == []
    assert len(checks["checks"]) == checks["planned"]
    names = {c["name"] for c in checks["checks"]}
    for want in ("lora_headline_grads_bf16", "lora_routed_headline_grads_bf16", "routing_E64_K8_fp32",
                 "routing_E64_K4_fp32", "routing_E64_K8_bf16", "routing_E64_K4_bf16", "routing_ties_bf16",
                 "lora_routed_poisoned_bf16", "lora_rank130_bf16", "lora_strided_bf16", "routing_neg_inf_rows_bf16"):
        assert want in names, want
    for c in checks["checks"]:
        assert c["ok"] is True and c["seconds"] > 0 and "triton_compiles" in c, c
    grads = next(c for c in checks["checks"] if c["name"] == "lora_headline_grads_bf16")
    assert set(grads["errors"]) == {"out", "dx", "dA", "dB", "dgates"}  # gradient values, not finiteness

    bench = json.loads((out / "bench_ops.json").read_text())
    assert bench["all_ok"] and bench["complete"] and bench["skipped"] == 0 and "triton" in bench["backends"]
    rows = bench["results"]
    kinds = {(r["op"], r["backend"], r["kind"], r.get("gating"), r["dtype"], r.get("K")) for r in rows}
    for want in [("loramoe_delta_fwd", "triton", "kernel", "top2", "fp32", None),
                 ("loramoe_delta_fwd", "triton", "e2e", "top4", "fp32", None),  # routed (E=9 x r=32)
                 ("loramoe_delta_fwd", "torch_loop", "e2e", "top2", "fp32", None),
                 ("loramoe_delta_fwd_bwd", "triton", "e2e", "top4", "fp32", None),
                 ("routing_stats", "triton", "kernel", None, "bf16", 8),
                 ("routing_stats", "triton", "kernel", None, "fp32", 4),
                 ("routing_stats", "torch_softmax_topk_bincount", "e2e", None, "fp32", 4)]:
        assert want in kinds, want
    for r in rows:  # bytes and fraction of measured bandwidth on every row; fwd+bwd rows check gradient values
        assert r["bytes"] > 0 and r["bw_fraction"] > 0 and r["median_ms"] > 0 and r["ok"] is True, r
        if r["op"] == "loramoe_delta_fwd_bwd":
            assert r["grads_checked"][:4] == ["out", "dx", "dA", "dB"] and r["err_over_allowed"] <= 1.0, r
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--table",
                            str(out / "bench_ops.json")], env={**offline_env(), "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    assert table.stdout.count("| routing_stats |") == sum(r["op"] == "routing_stats" for r in rows)


@needs_shell
def test_gpu_mode_without_a_gpu_stops_at_the_preflight(tmp_path):
    """The GPU run on a machine without CUDA: the preflight says why and nothing else runs (no lease wasted)."""
    out = tmp_path / "gv"
    env = offline_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    if "cuda_available=True" in (out / "env.txt").read_text():
        pytest.skip("a CUDA device is visible")
    assert proc.returncode == 1
    assert "PROBLEM: no CUDA device visible to torch" in (out / "env.txt").read_text()
    assert "preflight failed" in (out / "summary.txt").read_text()
    assert {p.name for p in out.iterdir()} == {"env.txt", "summary.txt"}


@needs_shell
def test_usage_errors_exit_2(tmp_path):
    for args in ([], ["--bogus", str(tmp_path)], [str(tmp_path / "a"), str(tmp_path / "b")]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=offline_env(), capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2 and "gpu_validate.sh" in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(os.name != "posix", reason="needs signals")
def test_checks_killed_mid_run_keep_their_rows(tmp_path):
    """checks.json is complete JSON after every row: a run killed part-way keeps the rows it finished."""
    out = tmp_path / "checks.json"
    env = offline_env(TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), "--tiny", "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        rows = []
        while time.time() < deadline and proc.poll() is None:
            if out.exists():
                rows = json.loads(out.read_text())["checks"]
                if len(rows) >= 2:
                    break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    payload = json.loads(out.read_text())
    assert len(payload["checks"]) >= 2 and "complete" not in payload
    assert payload["checks"][0]["name"] == "lora_headline_grads_bf16" and payload["checks"][0]["ok"] is True


def test_budget_spent_rows_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "checks.json"
    env = offline_env(TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), "--tiny", "--out", str(out),
                           "--budget-s", "1e-9"], env=env, capture_output=True, text=True, timeout=120)
    payload = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert payload["complete"] and len(payload["skipped"]) == payload["planned"] == len(payload["checks"])
    assert all(c["ok"] is None and c["skipped"] for c in payload["checks"])
