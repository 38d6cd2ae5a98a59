"""Each objective's value on a fixed tiny batch against a hand computation of the
formulas in moe_unlearn/unlearning/objectives.py
(plain Python math on the numbers, not the library's helpers)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_unlearn.errors import BadInputError
from moe_unlearn.unlearning.anchor import anchor_target, retain_routing_kl, router_anchor_loss
from moe_unlearn.unlearning.objectives import OBJECTIVES, ObjectiveInputs, get_objective

# B=2 sequences, S=3 positions, V=3 tokens; the second sequence has one padded position.
LOGITS = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 0.0, 0.0]],
                       [[2.0, 1.0, 0.0], [0.3, -0.3, 0.9], [1.0, 1.0, 1.0]]])
LABELS = torch.tensor([[0, 1, 2], [2, 0, -100]])
RETAIN_LOGITS = torch.tensor([[[0.1, 0.2, 0.3], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]])
RETAIN_LABELS = torch.tensor([[1, 2, 0]])
REF_RETAIN_LOGITS = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.1, 0.0]]])


def _logsoftmax(row, i):
    return row[i] - math.log(sum(math.exp(v) for v in row))


def _token_nlls(logits, labels):
    """Per sequence: list of next-token NLLs over scored positions."""
    out = []
    for b in range(len(labels)):
        seq = []
        for t in range(len(labels[b]) - 1):
            y = labels[b][t + 1]
            if y != -100:
                seq.append(-_logsoftmax(logits[b][t], y))
        out.append(seq)
    return out


F_NLL = _token_nlls(LOGITS.tolist(), LABELS.tolist())  # [[a, b], [c]]
R_NLL = _token_nlls(RETAIN_LOGITS.tolist(), RETAIN_LABELS.tolist())
CE_F = sum(sum(s) for s in F_NLL) / sum(len(s) for s in F_NLL)
CE_R = sum(sum(s) for s in R_NLL) / sum(len(s) for s in R_NLL)


def _inputs(**kw):
    return ObjectiveInputs(forget_logits=LOGITS, forget_labels=LABELS, **kw)


def _retain(**kw):
    return dict(retain_logits=RETAIN_LOGITS, retain_labels=RETAIN_LABELS, retain_mask=torch.ones(1, 3), **kw)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_ga():
    out = OBJECTIVES["ga"].loss(_inputs(), {})
    assert out["loss"].item() == pytest.approx(-CE_F, rel=1e-6)
    assert F_NLL[1] and len(F_NLL[1]) == 1  # the padded label is not scored


def test_graddiff_nll_and_kl():
    hp = OBJECTIVES["graddiff"].hparams({"gamma": 0.5, "alpha": 2.0})
    out = OBJECTIVES["graddiff"].loss(_inputs(**_retain()), hp)
    assert out["loss"].item() == pytest.approx(-0.5 * CE_F + 2.0 * CE_R, rel=1e-6)

    hp = OBJECTIVES["graddiff"].hparams({"retain_loss": "kl"})
    out = OBJECTIVES["graddiff"].loss(_inputs(**_retain(retain_ref_logits=REF_RETAIN_LOGITS)), hp)
    kls = []
    for t in range(2):  # positions 0, 1 predict labels at 1, 2 (all scored)
        cur, ref = RETAIN_LOGITS[0, t].tolist(), REF_RETAIN_LOGITS[0, t].tolist()
        kls.append(sum(math.exp(_logsoftmax(ref, v)) * (_logsoftmax(ref, v) - _logsoftmax(cur, v))
                       for v in range(3)))
    assert out["loss"].item() == pytest.approx(-CE_F + sum(kls) / 2, rel=1e-5)


def test_npo():
    ref_logp = torch.tensor([-1.5, -0.7])
    beta = 0.1
    hp = OBJECTIVES["npo"].hparams()
    assert hp["beta"] == beta
    out = OBJECTIVES["npo"].loss(_inputs(forget_ref_logp=ref_logp, **_retain()), hp)
    terms = []
    for b in range(2):
        logp = -sum(F_NLL[b])
        terms.append(math.log(_sigmoid(-beta * (logp - ref_logp[b].item()))))
    lf = -(2 / beta) * sum(terms) / 2
    assert out["npo"].item() == pytest.approx(lf, rel=1e-6)
    assert out["loss"].item() == pytest.approx(lf + CE_R, rel=1e-6)


def test_simnpo():
    hp = OBJECTIVES["simnpo"].hparams({"delta": 0.3})
    beta, gamma = 4.5, 0.125
    assert (hp["beta"], hp["gamma"]) == (beta, gamma)
    out = OBJECTIVES["simnpo"].loss(_inputs(), hp)
    terms = [math.log(_sigmoid(beta * (sum(s) / len(s) - 0.3))) for s in F_NLL]
    lf = -(2 / beta) * sum(terms) / 2
    assert out["loss"].item() == pytest.approx(gamma * lf, rel=1e-6)


def test_rmu():
    h = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[3.0, -1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])  # the [9, 9] token is padding
    steer = torch.tensor([1.0, 1.0])
    rh = torch.tensor([[[0.5, 0.5], [1.0, 1.0]]])
    rref = torch.tensor([[[0.0, 0.5], [1.0, 3.0]]])
    inp = ObjectiveInputs(forget_hidden=h, forget_mask=mask, steering=steer, forget_labels=LABELS,
                          retain_hidden=rh, retain_ref_hidden=rref, retain_mask=torch.ones(1, 2),
                          retain_labels=torch.zeros(1, 2, dtype=torch.long))
    out = OBJECTIVES["rmu"].loss(inp, OBJECTIVES["rmu"].hparams({"alpha": 10.0}))
    lf = ((0 + 1) + (1 + 0) + (4 + 4)) / (3 * 2)
    lr = ((0.25 + 0) + (0 + 4)) / (2 * 2)
    assert out["rmu_forget"].item() == pytest.approx(lf)
    assert out["loss"].item() == pytest.approx(lf + 10 * lr)


def test_anchor_and_retain_routing_by_hand():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    mask = torch.tensor([True, True, False])
    target = anchor_target(3, [2])
    expect = (((0.7 ** 2 + 0.2 ** 2 + 0.9 ** 2) / 3) + ((0.1 ** 2 + 0.1 ** 2 + 0.2 ** 2) / 3)) / 2
    assert router_anchor_loss(scores, mask, target).item() == pytest.approx(expect, rel=1e-6)
    assert anchor_target(4, [1, 3]).tolist() == [0, 0.5, 0, 0.5]
    ref = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    kl0 = sum(p * math.log(p / q) for p, q in zip([0.5, 0.25, 0.25], [0.7, 0.2, 0.1], strict=True))
    kl1 = sum(p * math.log(p / q) for p, q in zip([0.2, 0.2, 0.6], [0.1, 0.1, 0.8], strict=True))
    assert retain_routing_kl(ref, scores, mask).item() == pytest.approx((kl0 + kl1) / 2, rel=1e-5)


def test_registry_errors():
    with pytest.raises(BadInputError, match="eul, ga, graddiff, npo, rmu, simnpo"):
        get_objective("dpo")
    with pytest.raises(BadInputError, match="valid: .*beta"):
        OBJECTIVES["npo"].hparams({"betta": 0.2})


def test_retain_routing_kl_compares_sigmoid_scores_as_preferences():
    """Sigmoid router scores do not sum to 1: the KL is taken on the per-token normalised scores
    (by hand: KL([.5,.25,.25] || [.7,.2,.1])), and a zero KL means the same preference."""
    ref_sig = torch.tensor([[0.8, 0.4, 0.4]])  # normalises to [.5, .25, .25]
    new_sig = torch.tensor([[0.35, 0.1, 0.05]])  # normalises to [.7, .2, .1]
    mask = torch.tensor([True])
    kl = sum(p * math.log(p / q) for p, q in zip([0.5, 0.25, 0.25], [0.7, 0.2, 0.1], strict=True))
    assert retain_routing_kl(ref_sig, new_sig, mask).item() == pytest.approx(kl, rel=1e-5)
    assert retain_routing_kl(ref_sig, ref_sig * 0.5, mask).item() == pytest.approx(0.0, abs=1e-7)
