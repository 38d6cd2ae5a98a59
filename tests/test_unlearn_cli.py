"""`moe-unlearn unlearn` end to end on a saved tiny model."""

from __future__ import annotations

import json

import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.cli import main
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import apply_patch


def test_cli_writes_a_patch_that_applies(tmp_path, capsys):
    model_dir = tmp_path / "model"
    base = tiny_model("qwen3_moe")
    base.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(" ".join(f"w{(i + j) % 20}" for j in range(8)) for i in range(4)))
    out = tmp_path / "patch"
    rc = main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--method", "npo", "--scope", "uoe",
               "--target", "1:3", "--out", str(out), "--steps", "2", "--lr", "1e-2", "--set", "beta=0.2",
               "--quiet", "--device", "cpu"])
    assert rc == 0
    meta = json.loads((out / "patch.json").read_text())
    assert meta["targets"] == ["1:3"] and meta["hyperparameters"]["beta"] == 0.2
    apply_patch(base, out)  # the saved model's weights + patch
    router = base.model.layers[1].mlp.gate.weight
    assert not torch.equal(router, tiny_model("qwen3_moe").model.layers[1].mlp.gate.weight)

    rc = main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--target", "1:3",
               "--out", str(model_dir), "--quiet"])
    assert rc == 2 and "model's own directory" in capsys.readouterr().err
