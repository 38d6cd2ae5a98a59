"""The calibrated relearning attack: the lr is the highest of a grid under which the original keeps
its held facts; area under the curve and highest held EM, with the retrained reference as the floor."""

from __future__ import annotations

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.items import as_items
from moe_unlearn.eval.relearn import (
    RelearnConfig,
    RelearnCurve,
    calibrate_relearn,
    calibrated_relearn_probe,
    split_indices,
)
from moe_unlearn.eval.scoring import encode_items
from moe_unlearn.testing import tiny_model

TOK = word_tokenizer()
BASE = RelearnConfig(steps=6, eval_every=2, batch_size=3)
DAMAGING, GENTLE = 0.3, 1e-6


def _greedy_facts(model, n: int = 12) -> list[dict[str, str]]:
    """QA records whose answer is the model's own greedy next word (held EM 1.0 by construction)."""
    out = []
    for i in range(60):
        q = f"w{i} w{(i * 7 + 3) % 60} w{(i * 11 + 5) % 60}"
        ids = encode_items(TOK, as_items([{"question": q, "answer": "w0"}]))[0].ids[:-1]
        with torch.no_grad():
            word = TOK.convert_ids_to_tokens(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if word.startswith("w"):
            out.append({"question": q, "answer": word})
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def planted():
    original = tiny_model("qwen3_moe", seed=3)
    facts = _greedy_facts(original)
    tr, held = split_indices(len(facts), 0.25, seed=0)
    # the fine-tuned facts get other answers: a strong attack overwrites what the model knows
    train = [{"question": facts[i]["question"], "answer": f"w{(j * 17 + 2) % 60}"} for j, i in enumerate(tr)]
    return original, train, [facts[i] for i in held]


def test_the_auc_is_the_mean_held_em_over_the_attack():
    c = RelearnCurve(steps=[0, 5, 10], em=[0.0, 0.5, 1.0], nll=[1, 1, 1])
    assert c.auc() == pytest.approx((2.5 * 0.5 + 2.5 * 1.5) / 10)  # trapezoids / budget = 0.5
    assert c.max_em() == 1.0
    assert RelearnCurve(steps=[0], em=[0.25], nll=[1]).auc() == 0.25


def test_calibration_takes_the_highest_lr_that_keeps_the_original(planted):
    original, train, held = planted
    cal = calibrate_relearn(original, TOK, train, held, BASE, lrs=(GENTLE, DAMAGING))
    assert cal.tried[DAMAGING] < 0.9  # the strong attack damages the original by itself ...
    assert cal.config.lr == GENTLE and min(cal.original_curve.em) >= 0.9  # ... the chosen one does not
    assert cal.config.steps == BASE.steps and cal.config.fraction == BASE.fraction  # only the lr changed
    assert list(cal.tried) == [DAMAGING, GENTLE]  # tried from high to low, stopped at the first kept
    assert cal.to_dict()["lr"] == GENTLE
    with pytest.raises(BadInputError, match="keeps the original's held EM >= 0.9 x"):
        calibrate_relearn(original, TOK, train, held, BASE, lrs=(DAMAGING,))
    with pytest.raises(BadInputError, match="keep must be"):
        calibrate_relearn(original, TOK, train, held, BASE, keep=0.0)


def test_calibrated_probe_reports_steps_auc_and_the_floor(planted):
    original, train, held = planted
    stranger = tiny_model("qwen3_moe", seed=11)
    res, cal = calibrated_relearn_probe({"original": original, "reference": stranger}, TOK, train, held, BASE,
                                        lrs=(DAMAGING, GENTLE))
    assert res.curves["original"] is cal.original_curve  # calibration's curve, not a second run
    assert res.level == pytest.approx(0.5) and res.budget == BASE.steps
    assert res.steps_to_half["original"] == 0
    d = res.to_dict()
    assert d["auc"]["original"] == res.curves["original"].auc() >= 0.9
    assert d["auc_above_reference"]["original"] == pytest.approx(d["auc"]["original"] - d["auc"]["reference"],
                                                                 abs=1e-4)
    assert d["max_em"]["reference"] == max(res.curves["reference"].em)
    assert d["auc"]["reference"] < d["auc"]["original"]  # the stranger never knew these facts
    with pytest.raises(BadInputError, match="needs the original"):
        calibrated_relearn_probe({"reference": stranger}, TOK, train, held, BASE)


def test_the_old_defaults_stay_reachable():
    assert RelearnConfig().lr == 1e-3 and RelearnConfig().steps == 40 and RelearnConfig().fraction == 0.15
