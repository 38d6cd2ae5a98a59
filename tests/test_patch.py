"""Unlearning patches: bit-exact apply/revert, order of sequential patches, wrong models refused."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer
from safetensors.torch import load_file

from moe_unlearn.errors import PatchError
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import apply_patch, revert_patch, unlearn

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 3 + j) % 30}" for j in range(8)) for i in range(4)]
KW = dict(tokenizer=TOK, batch_size=2, max_length=12, progress=False, method="ga", scope="uoe", steps=2, lr=1e-2)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, state):
    return all(torch.equal(p, state[n]) for n, p in model.named_parameters())


def test_apply_revert_round_trip_bit_exact(tmp_path):
    model = tiny_model("qwen3_moe")
    orig = _state(model)
    res = unlearn(model, FORGET, target="1:4", out_dir=tmp_path / "p", **KW)
    unlearned = _state(model)
    assert not _same(model, orig)

    meta = json.loads((res.patch_path / "patch.json").read_text())
    assert meta["method"] == "ga" and meta["scope"] == "uoe" and meta["targets"] == ["1:4"]
    assert meta["base_model"]["model_type"] == "qwen3_moe" and "loss" in meta["final_terms"]
    names = {(e["name"], e["dim"], e["start"], e["stop"]) for e in meta["entries"]}
    assert names == {("model.layers.1.mlp.gate.weight", None, None, None),
                     ("model.layers.1.mlp.experts.gate_up_proj", 0, 4, 5),
                     ("model.layers.1.mlp.experts.down_proj", 0, 4, 5)}
    tensors = load_file(res.patch_path / "patch.safetensors")
    assert tensors["new.1"].shape[0] == 1  # one expert's slice, not the fused tensor

    revert_patch(model, res.patch_path)
    assert _same(model, orig)
    apply_patch(model, res.patch_path / "patch.safetensors")  # the file path works too
    assert _same(model, unlearned)

    fresh = tiny_model("qwen3_moe")  # an unmodified copy of the base model
    apply_patch(fresh, res.patch_path)
    assert _same(fresh, unlearned)
    with pytest.raises(PatchError, match="already applied"):
        apply_patch(fresh, res.patch_path)


def test_sequential_patches_apply_in_order(tmp_path):
    model = tiny_model("qwen3_moe")
    orig = _state(model)
    a = unlearn(model, FORGET, target="1:4", out_dir=tmp_path / "a", **KW)
    b = unlearn(model, FORGET[:2], target="1:4", out_dir=tmp_path / "b", **KW)  # same slices again
    final = _state(model)

    fresh = tiny_model("qwen3_moe")
    with pytest.raises(PatchError, match="in order"):
        apply_patch(fresh, b.patch_path)
    assert _same(fresh, orig)  # a refused patch writes nothing
    apply_patch(fresh, a.patch_path)
    apply_patch(fresh, b.patch_path)
    assert _same(fresh, final)
    with pytest.raises(PatchError, match="reverse order"):
        revert_patch(fresh, a.patch_path)
    revert_patch(fresh, b.patch_path)
    revert_patch(fresh, a.patch_path)
    assert _same(fresh, orig)


def test_patch_refuses_other_models(tmp_path):
    model = tiny_model("qwen3_moe")
    res = unlearn(model, FORGET, target="1:4", out_dir=tmp_path / "p", **KW)
    other_config = tiny_model("qwen3_moe", num_experts=8)
    with pytest.raises(PatchError, match="different model"):
        apply_patch(other_config, res.patch_path)
    other_weights = tiny_model("qwen3_moe", seed=1)
    before = _state(other_weights)
    with pytest.raises(PatchError, match="original values"):
        apply_patch(other_weights, res.patch_path)
    assert _same(other_weights, before)
