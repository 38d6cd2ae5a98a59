"""The MUSE / open-unlearning conventions, each against hand-computed values, and PrivLeak / MIA
against an independent implementation of MUSE's procedure (ROC by threshold sweep, trapezoid)."""

import json

import numpy as np
import pytest
import torch
from test_eval_metrics import FMT, BigramStub, word_tokenizer

from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.eval import EvalItem, as_items, evaluate
from moe_unlearn.eval import suite as suite_mod
from moe_unlearn.eval.conventions import CONVENTIONS, Convention, get_convention
from moe_unlearn.eval.metrics import cut_at_stop, rouge_l
from moe_unlearn.eval.mia import (
    MUSE_RETRAIN_AUC,
    auc,
    mia_result,
    min_k_count,
    min_k_score,
    privleak,
    reference_aucs,
)
from moe_unlearn.eval.scoring import ItemScores, ScoredSplit, encode, next_token_stats
from moe_unlearn.eval.suite import few_shot_prefix, mia_scores, verbmem_pairs


def muse_roc_auc(nonmember_scores, member_scores):
    """MUSE's sweep(): roc_curve(y, -score) with y = 0 for the first group (MUSE passes forget there),
    1 for the second, then the trapezoid area; written out by hand (thresholds at every distinct value)."""
    s = -np.concatenate([np.asarray(nonmember_scores, float), np.asarray(member_scores, float)])
    y = np.array([0] * len(nonmember_scores) + [1] * len(member_scores))
    fpr, tpr = [0.0], [0.0]
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tpr.append(float((pred & (y == 1)).sum() / (y == 1).sum()))
        fpr.append(float((pred & (y == 0)).sum() / (y == 0).sum()))
    return float(np.trapezoid(tpr, fpr))


def test_auc_orientation_and_privleak_match_muse_procedure():
    rng = np.random.default_rng(0)
    for trial in range(5):
        f = rng.normal(1.0, 1.0, 17).round(1)  # rounding makes ties
        h = rng.normal(1.5 + trial * 0.2, 1.0, 11).round(1)
        r_f, r_h = rng.normal(1.0, 1.0, 17).round(1), rng.normal(1.1, 1.0, 11).round(1)
        muse_u, muse_r = muse_roc_auc(f, h), muse_roc_auc(r_f, r_h)  # MUSE key "forget_holdout_Min-40%"
        assert 1 - auc(f, h) == pytest.approx(muse_u, abs=1e-12)
        muse_leak = (muse_u - muse_r) / muse_r * 100  # MUSE's eval.py
        assert privleak(auc(f, h), auc(r_f, r_h)) == pytest.approx(muse_leak, rel=1e-9)
    sklearn = pytest.importorskip("sklearn.metrics")
    fpr, tpr, _ = sklearn.roc_curve(np.r_[np.zeros(17), np.ones(11)], -np.r_[f, h])
    assert sklearn.auc(fpr, tpr) == pytest.approx(1 - auc(f, h), abs=1e-12)


def test_privleak_with_muse_published_reference():
    ref = reference_aucs("muse-news")
    assert ref == {"min_k": pytest.approx(1 - 0.4772)}
    assert MUSE_RETRAIN_AUC["books"] == 0.5393
    # our AUC 0.75 -> MUSE 0.25; (0.25 - 0.4772) / 0.4772 * 100
    forget = [{"loss": 1.0, "zlib": 1.0, "min_k": x, "min_k_pp": 1.0} for x in (1.0, 2.0, 3.0)]
    holdout = [{"loss": 1.0, "zlib": 1.0, "min_k": x, "min_k_pp": 1.0} for x in (2.0, 4.0)]
    res = mia_result(forget, holdout, "muse-news")
    assert res.auc["min_k"] == pytest.approx(0.75) and res.auc_muse["min_k"] == pytest.approx(0.25)
    assert res.privleak == {"min_k": pytest.approx((0.25 - 0.4772) / 0.4772 * 100)}
    with pytest.raises(BadInputError, match="muse-news"):
        reference_aucs("muse-wiki")


def test_min_k_rounding_conventions():
    assert [min_k_count(n, 0.4, "int") for n in (3, 5, 7, 10)] == [1, 2, 2, 4]
    assert min_k_count(2, 0.4, "floor_min1") == 1
    with pytest.raises(DataError, match="keeps no token"):
        min_k_count(2, 0.4, "int")
    logp = torch.tensor([-0.5, -3.0, -1.0, -2.0, -4.0, -0.1, -0.2])  # n = 7: int(2.8) = 2 lowest: -4, -3
    assert min_k_score(logp, 0.4, "int") == pytest.approx(3.5)
    assert min_k_score(logp, 0.1, "floor_min1") == pytest.approx(4.0)  # int(0.7) = 0 -> at least 1


def test_min_k_pp_variance_is_stable_on_near_uniform_distributions():
    gen = torch.Generator().manual_seed(0)
    for spread in (0.0024, 0.012, 1.0):
        logits = 7.0 + spread * torch.randn(4, 5000, generator=gen, dtype=torch.float64)
        lp64 = torch.log_softmax(logits, -1)
        var64 = ((lp64.exp()) * (lp64 - (lp64.exp() * lp64).sum(-1, keepdim=True)) ** 2).sum(-1)
        _, _, mu, sigma = next_token_stats(logits.float(), torch.zeros(4, dtype=torch.long))
        assert torch.allclose(sigma.double(), var64.sqrt(), rtol=2e-3), spread
        assert torch.allclose(mu.double(), (lp64.exp() * lp64).sum(-1), rtol=1e-5)
    # the textbook E[x^2] - E[x]^2 in fp32 is what this replaces: far off at spread 0.0024
    lp32 = torch.log_softmax(logits.float() * 0 + 7.0 + 0.0024 * torch.randn(4, 5000, generator=gen), -1)
    p = lp32.exp()
    naive = (p * lp32.square()).sum(-1) - (p * lp32).sum(-1).square()
    exact = torch.log_softmax(lp32.double(), -1)
    exact_var = (exact.exp() * (exact - (exact.exp() * exact).sum(-1, keepdim=True)) ** 2).sum(-1)
    assert ((naive.double() - exact_var).abs() / exact_var).max() > 0.1


def _scored(logp, offset):
    n = len(logp)
    return ItemScores(torch.tensor(logp), torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.ones(n), offset)


def test_mia_tokens_whole_sequence_vs_answer_only():
    item = EvalItem(question="q", answer="b c")
    s = _scored([-3.0, -1.0, -0.5], offset=1)  # prompt token, then two answer tokens
    split = ScoredSplit([s], None, [type("E", (), {"text": "q b c"})()])
    muse = mia_scores(split, [item], get_convention("muse"), 1.0, FMT)[0]
    ou = mia_scores(split, [item], get_convention("open-unlearning"), 1.0, FMT)[0]
    assert muse["loss"] == pytest.approx(1.5) and ou["loss"] == pytest.approx(0.75)
    text = EvalItem(text="q b c")  # a text is always scored whole
    assert mia_scores(split, [text], get_convention("open-unlearning"), 1.0, FMT)[0]["loss"] == pytest.approx(1.5)


def test_rouge_stemming_per_convention():
    assert rouge_l("the cats ran", "the cat ran", stemmer=False) == pytest.approx(200 / 3)
    assert rouge_l("the cats ran", "the cat ran", stemmer=True) == pytest.approx(100.0)
    assert CONVENTIONS["muse"].rouge_stemmer is False and CONVENTIONS["open-unlearning"].rouge_stemmer is True


def test_knowmem_few_shot_prompt_and_stops():
    shots = few_shot_prefix([EvalItem(question="q1", answer="a1"), EvalItem(question="q2", answer="a2")])
    assert shots == "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer: a2\n\n"
    stops = CONVENTIONS["muse"].knowmem_stops
    assert cut_at_stop("amber\n\nQuestion: next", stops) == "amber"
    assert cut_at_stop("amber\nQuestion: next", stops) == "amber"
    assert cut_at_stop("amber and teal\nmore", stops) == "amber and teal\nmore"


def test_evaluate_uses_the_convention_for_generation(monkeypatch):
    """Which prompts and lengths reach the decoder, per convention (the decoder is recorded, not run)."""
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, **kw):
        calls.append((kw["desc"], [list(p) for p in prompts], max_new_tokens))
        return [[] for _ in prompts]

    monkeypatch.setattr(suite_mod, "greedy_generate", fake_generate)
    tok = word_tokenizer()
    data = [{"question": "q", "answer": "b c"}, {"prompt": "q a", "gt": " b c d"}, "q b c d a b"]
    icl = [{"question": "a", "answer": "b"}]
    evaluate(BigramStub(), tok, forget=data, prompt_format=FMT, knowmem_icl=icl, progress=False,
             convention="muse")
    (_, qa_prompts, qa_len), (_, vm_prompts, vm_len) = calls
    assert qa_prompts == [encode(tok, "Question: a\nAnswer: b\n\nq", True)] and qa_len == 32
    assert vm_len == [128, 128]  # MUSE: always 128 new tokens
    assert vm_prompts[0] == encode(tok, "q a", True)  # the {prompt, gt} prompt exactly
    calls.clear()
    truth_len = Convention("truth-length", mia_tokens="all", min_k_rounding="floor_min1",
                           verbmem_new_tokens="truth", rouge_stemmer=True, knowmem_few_shot=False)
    evaluate(BigramStub(), tok, forget=data, prompt_format=FMT, knowmem_icl=icl, progress=False,
             convention=truth_len)
    (_, qa_prompts, _), (_, vm_prompts, vm_len) = calls
    assert qa_prompts == [encode(tok, "q", True)]  # no few-shot block
    assert vm_len == [3, 3]  # " b c d" = 3 tokens; "q b c d a b" split at half: 3 tokens each


def test_verbmem_pairs_for_muse_records_and_texts():
    tok = word_tokenizer()
    items = as_items([{"prompt": "q a", "gt": " b c d"}, "q b c d a b", "q"])
    pairs = verbmem_pairs(tok, items, prefix_tokens=32, max_new=2)
    ids = encode(tok, "q b c d a b", True)
    assert pairs == [(encode(tok, "q a", True), encode(tok, " b c d", True)[:2]), (ids[:3], ids[3:5])]


def test_muse_data_formats_load(tmp_path):
    verbmem = tmp_path / "forget.json"
    verbmem.write_text(json.dumps([{"prompt": "Once upon", "gt": " a time"}]))
    knowmem = tmp_path / "forget_qa.json"
    knowmem.write_text(json.dumps([{"question": "Who?", "answer": "Ann"}]))
    privleak_file = tmp_path / "holdout.json"
    privleak_file.write_text(json.dumps(["a held-out text", "another one"]))
    (item,) = as_items(verbmem)
    assert item == EvalItem(text="Once upon a time", prefix="Once upon") and item.continuation == " a time"
    assert as_items(knowmem) == [EvalItem(question="Who?", answer="Ann")]
    assert [i.text for i in as_items(privleak_file)] == ["a held-out text", "another one"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="list"):
        as_items(bad)
    with pytest.raises(DataError):
        EvalItem(text="abc", prefix="xyz")


def test_convention_validation():
    with pytest.raises(BadInputError, match="unknown convention"):
        get_convention("tofu-classic")
    with pytest.raises(BadInputError, match="mia_tokens"):
        Convention("x", mia_tokens="prompt", min_k_rounding="int", verbmem_new_tokens="fixed", rouge_stemmer=False)
    with pytest.raises(BadInputError, match="reference"):
        evaluate(BigramStub(), word_tokenizer(), forget=["q b c"], holdout=["q d d"], prompt_format=FMT,
                 reference_auc=0.5, reference_model=BigramStub(), progress=False, generate=False)


def test_reference_model_gives_privleak_zero_against_itself():
    forget, holdout = ["q b c", "q d d", "q a c"], ["q a c", "d d q", "q b c"]
    rep = evaluate(BigramStub(), word_tokenizer(), forget=forget, holdout=holdout, prompt_format=FMT,
                   generate=False, progress=False, reference_model=BigramStub(), convention="open-unlearning")
    assert 0 < rep.mia.auc["loss"] < 1
    assert rep.mia.reference_auc == rep.mia.auc
    assert rep.mia.privleak == {a: pytest.approx(0.0) for a in rep.mia.auc}
