"""`moe-unlearn inspect` on saved tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_unlearn.cli import main
from moe_unlearn.testing import tiny_dense_model, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in (("qwen2_moe", tiny_model("qwen2_moe")), ("deepseek_v3", tiny_model("deepseek_v3")),
                        ("llama", tiny_dense_model())):
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer")) + 2
    return [line.split() for line in lines[start:] if line.strip()]


def test_inspect_prints_the_expected_table(saved, capsys):
    assert main(["inspect", str(saved["qwen2_moe"])]) == 0
    out = capsys.readouterr().out
    model = tiny_model("qwen2_moe")
    total = sum(p.numel() for p in model.parameters())
    assert "Qwen2MoeForCausalLM" in out and "family=qwen2_moe" in out and "scores=softmax" in out
    assert f"parameters: {total:,}" in out and "dense layers: [1]" in out
    pct = f"{100 * 1536 / total:.4f}%"
    # layer, path, experts, top-K, shared ("yes (N)"), params/expert, % of model
    assert _table_rows(out) == [["0", "model.layers.0.mlp", "6", "2", "yes", "(2,336)", "1,536", pct],
                                ["2", "model.layers.2.mlp", "6", "2", "yes", "(2,336)", "1,536", pct]]


def test_inspect_json_and_loaded_weights_agree(saved, capsys):
    assert main(["inspect", str(saved["deepseek_v3"]), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(saved["deepseek_v3"]), "--json", "--load-weights"]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert meta == loaded
    assert meta["score_kind"] == "sigmoid" and meta["moe_layer_indices"] == [1, 2]
    assert meta["dense_layer_indices"] == [0] and meta["has_shared_experts"] is True


@pytest.mark.parametrize("case", ["missing", "no_config", "dense"])
def test_inspect_errors_exit_2_with_a_message(saved, tmp_path, capsys, case):
    path = {"missing": tmp_path / "nope", "no_config": tmp_path, "dense": saved["llama"]}[case]
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    expected = {"missing": "does not exist", "no_config": "no config.json",
                "dense": "LlamaForCausalLM"}[case]
    assert expected in err and err.startswith("moe-unlearn inspect: error:")
    if case == "dense":
        assert "supported families" in err and "mixtral" in err


def test_console_script_runs(saved):
    exe = shutil.which("moe-unlearn", path=str(Path(sys.executable).parent)) or shutil.which("moe-unlearn")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, "inspect", str(saved["qwen2_moe"])], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _table_rows(proc.stdout)[1][:4] == ["2", "model.layers.2.mlp", "6", "2"]
