"""Membership-inference scores, AUC and PrivLeak against hand-computed values."""

import math
import zlib

import pytest
import torch

from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.mia import (
    auc,
    loss_score,
    mia_result,
    min_k_pp_score,
    min_k_score,
    privleak,
    text_scores,
    zlib_score,
)
from moe_unlearn.eval.scoring import next_token_stats


def test_auc_known_ordering_with_ties():
    # holdout 2 beats forget 1, ties forget 2 (1/2), loses to 3; holdout 4 beats all three: 4.5 / 6
    assert auc([1.0, 2.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    assert auc([1.0, 2.0], [3.0, 4.0]) == 1.0  # holdout scores higher: forget recognised as members
    assert auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert auc([1.0, 1.0], [1.0]) == 0.5  # all tied


def test_auc_rejects_empty_and_nan():
    with pytest.raises(BadInputError):
        auc([], [1.0])
    with pytest.raises(BadInputError):
        auc([float("nan")], [1.0])


def test_privleak_formula_and_reference_validation():
    # MUSE: AUC' = 1 - AUC; (0.25 - 0.5) / 0.5 = -50% (forget still leaks); (0.75 - 0.5) / 0.5 = +50%
    assert privleak(0.75, 0.5) == pytest.approx(-50.0)
    assert privleak(0.25, 0.5) == pytest.approx(50.0)
    # retrained AUC 0.6 (ours) = 0.4 in MUSE's orientation; unlearned 0.9 -> (0.1 - 0.4) / 0.4 = -75%
    assert privleak(0.9, 0.6) == pytest.approx(-75.0)
    with pytest.raises(BadInputError):
        privleak(0.5, 1.0)


def test_loss_and_min_k_on_given_logprobs():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert loss_score(logp) == pytest.approx(3.0)
    # k = 40% of 5 tokens = 2 lowest: -5, -4 -> 4.5
    assert min_k_score(logp) == pytest.approx(4.5)
    assert min_k_score(logp, ratio=0.2) == pytest.approx(5.0)
    # 40% of 2 tokens floors to 0: at least one token is used
    assert min_k_score(torch.tensor([-0.5, -3.0])) == pytest.approx(3.0)
    with pytest.raises(BadInputError):
        min_k_score(logp, ratio=0.0)


def test_min_k_pp_from_a_known_distribution():
    # p = (1/2, 1/4, 1/4): mu = -1.5 ln2, sigma = 0.5 ln2; z(token 0) = +1, z(token 1) = -1
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    tok, correct, mu, sigma = next_token_stats(logits, torch.tensor([0, 1]))
    ln2 = math.log(2)
    assert torch.allclose(mu, torch.full((2,), -1.5 * ln2))
    assert torch.allclose(sigma, torch.full((2,), 0.5 * ln2))
    assert correct.tolist() == [True, False]
    z = (tok - mu) / sigma
    assert torch.allclose(z, torch.tensor([1.0, -1.0]), atol=1e-5)
    # two positions, 40% -> the single lowest z (-1) -> score +1
    assert min_k_pp_score(tok, mu, sigma) == pytest.approx(1.0, abs=1e-5)
    assert min_k_pp_score(tok, mu, sigma, ratio=1.0) == pytest.approx(0.0, abs=1e-5)


def test_zlib_divides_mean_nll_by_compressed_length():
    logp = torch.tensor([-2.0, -4.0])
    repetitive, varied = "aaaa aaaa aaaa aaaa", "the quick brown fox"
    assert zlib_score(logp, varied) == pytest.approx(3.0 / len(zlib.compress(varied.encode())))
    # same loss: the text that compresses better gets the higher (less member-like) score
    assert zlib_score(logp, repetitive) > zlib_score(logp, varied)


def test_mia_result_aucs_and_privleak_per_attack():
    logp_f = [torch.tensor([-0.1, -0.2, -0.1]), torch.tensor([-0.3, -0.1, -0.2])]  # members: low loss
    logp_h = [torch.tensor([-3.0, -2.0, -4.0]), torch.tensor([-2.5, -3.5, -2.0])]
    mu, sigma = torch.full((3,), -1.0), torch.ones(3)
    forget = [text_scores(lp, mu, sigma, "some forget text") for lp in logp_f]
    holdout = [text_scores(lp, mu, sigma, "some forget text") for lp in logp_h]
    res = mia_result(forget, holdout, reference_auc={"loss": 0.5})
    assert res.auc == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0, "min_k_pp": 1.0}
    assert res.privleak == {"loss": pytest.approx(-100.0)}  # leaks like a model that memorised the forget set
    assert res.auc_muse == {"loss": 0.0, "zlib": 0.0, "min_k": 0.0, "min_k_pp": 0.0}
    assert res.mean_forget["loss"] < res.mean_holdout["loss"]
    with pytest.raises(BadInputError):
        mia_result(forget, holdout, reference_auc={"lossy": 0.5})
