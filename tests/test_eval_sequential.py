"""MUSE sustainability (stacked requests) and scalability on a tiny model, and the CLI command."""

import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.sequential import MODES, UnlearnRequest, evaluate_scalability, evaluate_sequential
from moe_unlearn.testing import tiny_model

TOK = word_tokenizer()
REQ_A = [" ".join(f"w{(i * 7 + j) % 20}" for j in range(8)) for i in range(3)]
REQ_B = [" ".join(f"w{20 + (i * 3 + j) % 20}" for j in range(8)) for i in range(3)]
RETAIN = [" ".join(f"w{60 + (i * 5 + j) % 40}" for j in range(8)) for i in range(3)]
HOLD = [" ".join(f"w{40 + (i * 11 + j) % 20}" for j in range(8)) for i in range(3)]
UNLEARN = dict(method="ga", scope="full", steps=3, lr=1e-2, batch_size=3, max_length=16, progress=False)
EVAL = dict(generate=False, convention="open-unlearning")


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sequential_requests_stack_and_restore(tmp_path):
    model = tiny_model("qwen3_moe")
    before = _state(model)
    res = evaluate_sequential(model, TOK, [UnlearnRequest("a", REQ_A, HOLD), UnlearnRequest("b", REQ_B)],
                              retain=RETAIN, unlearn_kwargs=UNLEARN, eval_kwargs=EVAL, work_dir=tmp_path)
    assert [s.step for s in res.steps] == [0, 1, 2] and [s.n_forget for s in res.steps] == [0, 3, 6]
    nll = [(s.metrics["forget_a.nll"], s.metrics["forget_b.nll"]) for s in res.steps]
    assert nll[1][0] > nll[0][0]  # request a unlearned at step 1 (gradient ascent raises its NLL)
    assert nll[2][1] > nll[1][1]  # request b at step 2, stacked on a
    assert "retain.nll" in res.steps[2].metrics and "mia.auc.loss" in res.steps[1].metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1_a", "step2_b"]
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # both patches reverted, bit-exact
    paths = res.write_all(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["steps"][2]["request"] == "b"
    assert "| 2 | b | 6 |" in paths["markdown"].read_text()


def test_scalability_undoes_each_size_and_modes_are_pluggable(tmp_path):
    model = tiny_model("qwen3_moe")
    before = _state(model)
    calls = []

    def recording_mode(model, tokenizer, request, retain, out_dir, kw):
        calls.append((request.name, len(request.forget)))
        return MODES["stacked"]()(model, tokenizer, request, retain, out_dir, kw)

    MODES["recording"] = lambda: recording_mode
    try:
        res = evaluate_scalability(model, TOK, REQ_A + REQ_B, [2, 6], retain=RETAIN, holdout=HOLD,
                                   mode="recording", unlearn_kwargs=UNLEARN, eval_kwargs=EVAL, work_dir=tmp_path)
    finally:
        del MODES["recording"]
    assert calls == [("n2", 2), ("n6", 6)]
    assert [s.n_forget for s in res.steps] == [0, 2, 6]
    assert res.steps[2].metrics["forget_subset.nll"] > res.steps[0].metrics["forget_all.nll"]
    assert all(torch.equal(v, _state(model)[n]) for n, v in before.items())
    with pytest.raises(BadInputError, match="sizes"):
        evaluate_scalability(model, TOK, REQ_A, [7], retain=RETAIN, work_dir=tmp_path)
    with pytest.raises(BadInputError, match="mode"):
        evaluate_sequential(model, TOK, [UnlearnRequest("a", REQ_A)], retain=RETAIN, mode="merged", work_dir=tmp_path)


def test_cli_evaluate_sequential(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    files = {}
    for name, data in (("a", REQ_A), ("b", REQ_B), ("retain", RETAIN)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in data))
    args = ["evaluate-sequential", "--model", str(model_dir), "--request", f"a={files['a']}",
            "--request", f"b={files['b']}", "--retain", str(files["retain"]), "--method", "ga", "--scope", "full",
            "--steps", "2", "--lr", "1e-2", "--no-generate", "--quiet"]
    assert main(args + ["--request", "c=missing.jsonl", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "sustainability.json").read_text())
    assert [s["request"] for s in rep["steps"]] == [None, "a", "b"]
