"""One run config: UnlearnConfig == keyword arguments, stored in patch.json, replayable from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer
from safetensors.torch import load_file

from moe_unlearn.cli import main
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import UnlearnConfig, unlearn

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(9)) for i in range(6)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(9)) for i in range(6)]


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_config_and_keywords_are_the_same_run(tmp_path):
    kw = dict(method="npo", scope="uoe", target="1:2", steps=2, lr=1e-2, batch_size=3, max_length=12,
              method_kwargs={"beta": 0.2}, retain_routing_weight=0.3, progress=False)
    a, b = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    ra = unlearn(a, FORGET, RETAIN, tokenizer=TOK, **kw)
    rb = unlearn(b, FORGET, RETAIN, tokenizer=TOK, config=UnlearnConfig(**{**kw, "lr": 1.0}), lr=1e-2)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa) and ra.final_terms == rb.final_terms
    with pytest.raises(TypeError, match="unknown options \\['lr_rate'\\]"):
        unlearn(a, FORGET, tokenizer=TOK, lr_rate=1e-3)
    cfg = UnlearnConfig(**kw)
    assert UnlearnConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == UnlearnConfig.build(
        cfg, target=["1:2"])


def test_patch_json_replays_through_the_cli(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(FORGET))
    retain.write_text("\n".join(RETAIN))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model: {model_dir}\nforget: {forget}\nretain: {retain}\nmethod: graddiff\n"
                        "target: ['1:3']\nsteps: 5\nlr: 0.01\nbatch_size: 3\nmax_length: 12\n"
                        "method_kwargs: {alpha: 0.5}\n")
    first = tmp_path / "first"
    assert main(["unlearn", "--config", str(run_file), "--steps", "2", "--out", str(first), "--quiet",
                 "--device", "cpu"]) == 0  # a flag overrides the file
    meta = json.loads((first / "patch.json").read_text())
    assert meta["config"]["steps"] == 2 and meta["config"]["method"] == "graddiff"
    assert meta["config"]["method_kwargs"] == {"alpha": 0.5} and meta["hyperparameters"]["alpha"] == 0.5
    assert meta["inputs"]["forget"] == str(forget.resolve()) and meta["steps_run"] == 2
    again = tmp_path / "again"
    assert main(["unlearn", "--config", str(first / "patch.json"), "--out", str(again), "--quiet",
                 "--device", "cpu"]) == 0
    a, b = load_file(str(first / "patch.safetensors")), load_file(str(again / "patch.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_run_files_fail_cleanly(tmp_path, capsys):
    bad = tmp_path / "run.json"
    bad.write_text('{"lr_rate": 1}')
    assert main(["unlearn", "--config", str(bad), "--model", "m", "--forget", "f", "--out", "o"]) == 2
    assert "unknown run options ['lr_rate']" in capsys.readouterr().err
    assert main(["unlearn", "--forget", "f", "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
