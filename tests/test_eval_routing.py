"""Routing metrics (overlap, KL, load entropy, target gate mass) on planted routings."""

import math

import pytest
import torch

from moe_unlearn.errors import BadInputError
from moe_unlearn.eval import RoutingRecording, compare_routing
from moe_unlearn.eval.routing import token_overlap


def recording(idx, score=None, num_experts=4, tokens_per_item=None, fp="same"):
    idx = torch.tensor(idx)
    score = torch.tensor(score) if score is not None else torch.full(idx.shape, 0.25)
    return RoutingRecording({0: idx}, {0: score.float()}, {0: num_experts},
                            tokens_per_item or [idx.shape[0]], fp)


def test_token_overlap_ignores_order():
    orig = torch.tensor([[0, 1], [2, 3], [4, 5]])
    new = torch.tensor([[1, 0], [2, 5], [0, 1]])
    assert token_overlap(new, orig).tolist() == [1.0, 0.5, 0.0]


def test_planted_overlap_kl_entropy_gate_mass():
    orig = recording([[0, 1], [0, 1]], [[0.6, 0.3], [0.7, 0.2]])  # P_orig = (1/2, 1/2, 0, 0)
    new = recording([[0, 1], [0, 2]], [[0.6, 0.3], [0.5, 0.2]])  # P_new = (1/2, 1/4, 1/4, 0)
    cmp = compare_routing(new, orig, target=(0, 2))
    assert cmp.overlap == [pytest.approx(0.75)]
    assert cmp.kl == [pytest.approx(0.5 * math.log(2))]  # KL(P_orig || P_new) = 1/2 ln(1/2 / 1/4)
    assert cmp.load_entropy == [pytest.approx(1.5 * math.log(2))]
    assert cmp.load_entropy_original == [pytest.approx(math.log(2))]
    assert cmp.max_entropy == [pytest.approx(math.log(4))]
    assert cmp.target == (0, 2)
    assert cmp.target_gate_mass == pytest.approx(0.1)  # 0.2 on one of two tokens
    assert cmp.target_selection_rate == pytest.approx(0.5)
    assert cmp.target_gate_mass_original == 0.0 and cmp.target_selection_rate_original == 0.0
    expert0 = compare_routing(new, orig, target=(0, 0))
    assert expert0.target_gate_mass == pytest.approx(0.55)
    assert expert0.target_gate_mass_original == pytest.approx(0.65)


def test_identical_routing_gives_overlap_one_and_kl_zero():
    rec = recording([[0, 3], [1, 2], [3, 1]])
    cmp = compare_routing(rec, rec)
    assert cmp.overlap_mean == 1.0 and cmp.kl_mean == 0.0
    assert cmp.load_entropy == cmp.load_entropy_original


def test_kl_with_an_expert_the_new_model_never_picks_is_large_but_finite():
    cmp = compare_routing(recording([[0, 1]]), recording([[2, 3]]))
    assert cmp.overlap == [0.0]
    assert 10 < cmp.kl[0] < 30  # clamped at 1e-10: ln(0.5 / 1e-10) ~ 22


def test_recordings_of_different_tokens_are_rejected():
    with pytest.raises(BadInputError, match="different tokens"):
        compare_routing(recording([[0, 1]], fp="x"), recording([[0, 1]], fp="y"))
    with pytest.raises(BadInputError, match="target"):
        compare_routing(recording([[0, 1]]), recording([[0, 1]]), target=(5, 0))
    with pytest.raises(BadInputError, match="target expert"):
        compare_routing(recording([[0, 1]]), recording([[0, 1]]), target=(0, 4))
