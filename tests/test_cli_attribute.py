"""`moe-unlearn attribute`: outputs match the API, bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
import random

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.attribution import Attribution, attribute_experts
from moe_unlearn.cli import main
from moe_unlearn.testing import tiny_dense_model, tiny_model


def _texts(n=12, seed=0):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(100)}" for _ in range(rng.randrange(2, 20))) for _ in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_attr")
    tok = word_tokenizer()
    model = tiny_model("qwen3_moe", seed=4)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tiny_dense_model().save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    data = root / "forget.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in _texts()) + "\n")
    return root, model, tok, data


def test_attribute_writes_json_and_png_matching_api(saved, tmp_path, capsys):
    root, model, tok, data = saved
    out = tmp_path / "run"
    rc = main(["attribute", "--model", str(root / "model"), "--data", str(data), "--out", str(out),
               "--field", "body", "--batch-size", "5", "--max-length", "8", "--stability"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["attribution.json", "attribution.png"]
    assert (out / "attribution.png").read_bytes()[:4] == b"\x89PNG"
    got = Attribution.from_json(out / "attribution.json")
    ref = attribute_experts(model, _texts(), tokenizer=tok, batch_size=5, max_length=8, progress=False)
    torch.testing.assert_close(got.affinity, ref.affinity, atol=1e-6, rtol=1e-5)
    assert got.num_truncated == ref.num_truncated > 0 and got.stability is not None
    best = ref.top(1)[0]
    printed = capsys.readouterr().out
    assert f"target: layer {best.layer} expert {best.expert}" in printed
    assert f"#1: layer {best.layer} expert {best.expert}" in printed
    assert ("NEAR-TIE" in printed) == best.near_tie
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_existing_out_dir_keeps_other_files(saved, tmp_path):
    root, _, _, data = saved
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["attribute", "--model", str(root / "model"), "--data", str(data), "--out", str(out),
                 "--field", "body"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attribution.json", "attribution.png", "notes.txt"]


@pytest.mark.parametrize("case", ["empty", "missing", "no_field", "dense", "no_model_dir", "bad_batch"])
def test_bad_input_exits_2_and_writes_nothing(saved, tmp_path, capsys, case):
    root, _, _, data = saved
    model_dir = root / ("dense" if case == "dense" else "model")
    if case == "no_model_dir":
        model_dir = tmp_path / "nowhere"
    args = ["--field", "body"]
    if case == "empty":
        data = tmp_path / "empty.txt"
        data.write_text("\n \n")
        args = []
    elif case == "missing":
        data = tmp_path / "gone.jsonl"
    elif case == "no_field":
        args = ["--field", "content"]
    elif case == "bad_batch":
        args += ["--batch-size", "0"]
    out = tmp_path / "out"
    rc = main(["attribute", "--model", str(model_dir), "--data", str(data), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "moe-unlearn attribute: error:" in err
    expected = {"empty": "empty", "missing": "does not exist", "no_field": "no field 'content'",
                "dense": "not a supported MoE model", "no_model_dir": "does not exist",
                "bad_batch": "--batch-size"}[case]
    assert expected in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if p.name in ("empty.txt",))
