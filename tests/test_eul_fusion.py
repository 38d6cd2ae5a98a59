"""The EUL objective, the regression merge of adapters (fuse_patches) and the fused sequential mode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError, PatchError
from moe_unlearn.eval.sequential import UnlearnRequest, evaluate_sequential
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import apply_patch, revert_patch, unlearn
from moe_unlearn.unlearning.adapters import lowrank_delta
from moe_unlearn.unlearning.fusion import fuse_patches, regression_merge
from moe_unlearn.unlearning.objectives import ObjectiveInputs, get_objective
from moe_unlearn.unlearning.patch import entry_layout, entry_parts, load_patch

TOK = word_tokenizer()
F1 = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(8)) for i in range(6)]
F2 = [" ".join(f"w{(i * 5 + j) % 30 + 10}" for j in range(8)) for i in range(6)]
RETAIN = [" ".join(f"w{40 + (i * 3 + j) % 20}" for j in range(5)) for i in range(3)]
KW = dict(tokenizer=TOK, batch_size=3, max_length=16, progress=False, method="npo", steps=3, lr=3e-2,
          scope="uoe", adapter="lora", adapter_rank=2)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _target(model):
    return (find_moe_layers(model)[-1].layer_idx, 1)


# -- EUL ------------------------------------------------------------------------------------------


def _kl_by_hand(p_logits, q_logits, labels):
    """mean over scored next-token positions of sum_v p log(p / q), with plain Python loops."""
    total, n = 0.0, 0
    b_, s_, v_ = p_logits.shape
    for b in range(b_):
        for t in range(s_ - 1):
            if labels[b, t + 1] == -100:
                continue
            zp = [math.exp(x) for x in p_logits[b, t].tolist()]
            zq = [math.exp(x) for x in q_logits[b, t].tolist()]
            p = [x / sum(zp) for x in zp]
            q = [x / sum(zq) for x in zq]
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
            n += 1
    return total / n


def _nll_by_hand(logits, labels):
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            z = [math.exp(x) for x in logits[b, t].tolist()]
            total -= math.log(z[y] / sum(z))
            n += 1
    return total / n


@pytest.mark.parametrize("alpha,gamma,task", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.0), (0.0, 1.0, 3.0)])
def test_eul_loss_matches_a_hand_computation(alpha, gamma, task):
    g = torch.Generator().manual_seed(int(alpha * 10 + gamma))
    fl, fr, rl, rr = (torch.randn(2, 5, 7, generator=g) for _ in range(4))
    flab = torch.randint(0, 7, (2, 5), generator=g)
    rlab = torch.randint(0, 7, (2, 5), generator=g)
    flab[0, :2] = -100  # a prompt: not scored
    rlab[1, 3] = -100
    inp = ObjectiveInputs(forget_logits=fl, forget_labels=flab, forget_mask=torch.ones(2, 5),
                          forget_ref_logits=fr, retain_logits=rl, retain_labels=rlab, retain_mask=torch.ones(2, 5),
                          retain_ref_logits=rr)
    obj = get_objective("eul")
    hp = obj.hparams({"alpha": alpha, "gamma": gamma, "task_weight": task})
    out = obj.loss(inp, hp)
    kl_f, kl_r = _kl_by_hand(fr, fl, flab), _kl_by_hand(rr, rl, rlab)  # KL(teacher || student)
    want = alpha * kl_r - gamma * kl_f + task * _nll_by_hand(rl, rlab)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert out["forget_kl"].item() == pytest.approx(kl_f, rel=1e-5)
    assert out["retain_kl"].item() == pytest.approx(kl_r, rel=1e-5)


def test_eul_defaults_and_checks():
    obj = get_objective("eul")
    assert obj.defaults == {"gamma": 1.0, "alpha": 1.0, "task_weight": 1.0}
    assert obj.requires_retain and obj.forget_reference == "logits"
    with pytest.raises(BadInputError, match="task_weight"):
        obj.hparams({"task_weight": -1.0})


@pytest.mark.parametrize("scope,extra", [("full", {}), ("uoe", {}), ("uoe", {"adapter": "lora"}),
                                         ("topm", {"top_m": 2})])
def test_eul_unlearns_under_every_scope(scope, extra):
    model = tiny_model("qwen3_moe")
    kw = dict(tokenizer=TOK, batch_size=3, max_length=16, progress=False, method="eul", steps=6, lr=3e-2, scope=scope,
              **extra)
    res = unlearn(model, F1, RETAIN, **kw)
    terms = res.history.terms["forget_kl"]
    assert terms[0] < 1e-6 < terms[-1]  # the student starts as the teacher, then moves away on forget data
    with pytest.raises(BadInputError, match="retain"):
        unlearn(tiny_model("qwen3_moe"), F1, None, **kw)


# -- fusion ---------------------------------------------------------------------------------------


def test_regression_merge_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 6, generator=g).double() for n in (9, 14, 7)]
    ws = [torch.randn(4, 6, generator=g).double() for _ in xs]
    fused = regression_merge(ws, [x.T @ x for x in xs])
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    lstsq = torch.linalg.lstsq(x_all, y_all).solution.T
    assert torch.allclose(fused, lstsq, atol=1e-10)
    # inputs in orthogonal subspaces: each adapter is reproduced exactly on its own inputs
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g).double())[0]
    x1, x2 = torch.randn(5, 3, generator=g).double() @ basis[:, :3].T, torch.randn(5, 3, generator=g).double() @ basis[:, 3:].T
    w = regression_merge([ws[0], ws[1]], [x1.T @ x1, x2.T @ x2])
    assert torch.allclose(x1 @ w.T, x1 @ ws[0].T, atol=1e-9) and torch.allclose(x2 @ w.T, x2 @ ws[1].T, atol=1e-9)


def _two_adapters(tmp_path, model, **kw):
    t = _target(model)
    r1 = unlearn(model, F1, RETAIN, target=t, out_dir=tmp_path / "p1", **{**KW, **kw})
    revert_patch(model, r1.patch_path)
    r2 = unlearn(model, F2, RETAIN, target=t, out_dir=tmp_path / "p2", **{**KW, **kw})
    revert_patch(model, r2.patch_path)
    return r1.patch_path, r2.patch_path


def test_fused_patch_is_the_regression_merge_of_the_stored_statistics(tmp_path):
    model = tiny_model("qwen2_moe")
    before = _state(model)
    p1, p2 = _two_adapters(tmp_path, model)
    fused = fuse_patches(model, [p1, p2], tmp_path / "f", ridge=1e-3, alpha=1.0)  # few tokens: singular Grams
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())  # fusion reads, never writes
    fm, ft = load_patch(fused)
    metas = [load_patch(p) for p in (p1, p2)]
    for i, m in enumerate(fm["entries"]):
        key = (m["name"], m["dim"], m["start"], m["stop"])
        items = [(mm["entries"][j], entry_parts(mm, tt, j)) for mm, tt in metas for j, e in enumerate(mm["entries"])
                 if (e["name"], e["dim"], e["start"], e["stop"]) == key]
        parts = entry_parts(fm, ft, i)
        if m.get("kind") == "lowrank":
            assert m["rank"] == sum(e["rank"] for e, _ in items)  # exactly low rank: sum of the ranks
            grams = [p["gram_forget"].double() @ p["gram_forget"].double().T
                     + p["gram_retain"].double() @ p["gram_retain"].double().T for _, p in items]
            deltas = [lowrank_delta(p["a"], p["b"]) for _, p in items]
            want = regression_merge(deltas, grams, ridge=1e-3)
            got = lowrank_delta(parts["a"], parts["b"])
            assert torch.allclose(got, want, atol=1e-5 * max(1.0, float(want.abs().max())))
            assert m["gram"]["forget_tokens"] == sum(e["gram"]["forget_tokens"] for e, _ in items)
    apply_patch(model, fused)
    assert not all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    revert_patch(model, fused)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())


def test_fusion_is_order_independent_and_refuses_what_it_cannot_merge(tmp_path):
    model = tiny_model("qwen2_moe")
    p1, p2 = _two_adapters(tmp_path, model)
    a = fuse_patches(model, [p1, p2], tmp_path / "a")
    b = fuse_patches(model, [p2, p1], tmp_path / "b")
    assert (a / "patch.safetensors").read_bytes() == (b / "patch.safetensors").read_bytes()
    # RegMean's off-diagonal scaling (the default alpha 0.9) changes the merge; alpha 1 is the plain regression
    plain = fuse_patches(model, [p1, p2], tmp_path / "plain", alpha=1.0)
    assert (plain / "patch.safetensors").read_bytes() != (a / "patch.safetensors").read_bytes()
    assert json.loads((a / "patch.json").read_text())["fusion"]["alpha"] == 0.9
    with pytest.raises(BadInputError, match="two"):
        fuse_patches(model, [p1], tmp_path / "c")
    full = unlearn(model, F1, RETAIN, target=_target(model), out_dir=tmp_path / "full",
                   **{**KW, "adapter": None})
    revert_patch(model, full.patch_path)
    with pytest.raises(BadInputError, match="adapter"):
        fuse_patches(model, [p1, full.patch_path], tmp_path / "d")
    apply_patch(model, p1)  # stacked: p3 is trained on top of p1, from other base values
    r3 = unlearn(model, F2, RETAIN, target=_target(model), out_dir=tmp_path / "p3", **KW)
    revert_patch(model, r3.patch_path)
    with pytest.raises(PatchError, match="different values|base values"):
        fuse_patches(model, [p2, r3.patch_path], tmp_path / "e")
    revert_patch(model, p1)
    assert not (tmp_path / "e").exists()


def test_sequential_fused_mode_keeps_one_fused_patch_and_restores(tmp_path):
    model = tiny_model("qwen3_moe")
    before = _state(model)
    reqs = [UnlearnRequest("a", F1[:3]), UnlearnRequest("b", F2[:3]), UnlearnRequest("c", F1[3:])]
    ukw = {k: v for k, v in KW.items() if k != "tokenizer"} | {"target": _target(model)}
    res = evaluate_sequential(model, TOK, reqs, retain=RETAIN, mode="fused", unlearn_kwargs=ukw,
                              eval_kwargs=dict(generate=False, batch_size=4), work_dir=tmp_path / "w")
    assert [s.request for s in res.steps] == [None, "a", "b", "c"]
    assert res.steps[3].metrics["forget_c.nll"] > res.steps[0].metrics["forget_c.nll"]
    assert (tmp_path / "w" / "step3_c" / "fused" / "patch.json").is_file()
    meta = json.loads((tmp_path / "w" / "step3_c" / "fused" / "patch.json").read_text())
    assert meta["fusion"]["patches"] == 3
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    with pytest.raises(BadInputError, match="adapter"):
        evaluate_sequential(model, TOK, reqs, retain=RETAIN, mode="fused",
                            unlearn_kwargs={**ukw, "adapter": None}, work_dir=tmp_path / "x",
                            eval_kwargs=dict(generate=False))


def test_cli_fuse(tmp_path, capsys):
    model_dir = tmp_path / "model"
    base = tiny_model("qwen2_moe")
    base.save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    p1, p2 = _two_adapters(tmp_path, base)
    out = tmp_path / "fused"
    assert main(["fuse", "--model", str(model_dir), "--patch", str(p1), "--patch", str(p2), "--out", str(out)]) == 0
    assert (out / "patch.json").is_file()
    assert main(["fuse", "--model", str(model_dir), "--patch", str(p1), "--out", str(tmp_path / "o2")]) == 2
    assert "two" in capsys.readouterr().err
    assert main(["fuse", "--model", str(model_dir), "--patch", str(p1), "--patch", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o3")]) == 2
    assert not (tmp_path / "o3").exists()
    layout = entry_layout(next(e for e in load_patch(out)[0]["entries"] if e.get("kind") == "lowrank"))
    assert layout.in_axis in (0, 1)
