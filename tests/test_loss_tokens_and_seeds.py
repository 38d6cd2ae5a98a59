"""Answer-only labels for QA records (training and evaluation agree) and seeds that mean something."""

from __future__ import annotations

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.data import Example, load_examples, tokenize_batches
from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.eval.items import EvalItem
from moe_unlearn.eval.scoring import PromptFormat, encode_items
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn
from moe_unlearn.unlearning.batches import ForgetRetainPairs

TOK = word_tokenizer()
QA = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{50 + i} w{60 + i}"} for i in range(7)]
TEXTS = [" ".join(f"w{(i * 3 + j) % 40}" for j in range(8)) for i in range(7)]


def test_qa_records_score_answer_tokens_only():
    ex = load_examples(QA, template="{question} w99 {answer}")
    assert ex[0] == Example("w0 w1 w2 w99", " w50 w60")
    tb = tokenize_batches(ex, TOK, batch_size=4, max_length=32)
    batch = next(iter(tb))
    for row in range(4):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        scored = (labels != -100).nonzero().flatten().tolist()
        assert scored == [4, 5], scored  # 4 prompt tokens, then the two answer tokens
        assert ids[scored].tolist() == TOK(f"w{50 + row} w{60 + row}", add_special_tokens=False)["input_ids"]
    every = next(iter(tokenize_batches(ex, TOK, batch_size=4, max_length=32, loss_tokens="all")))
    assert (every["labels"] != -100).sum() == every["attention_mask"].sum()


def test_plain_texts_score_every_token_and_records_with_text_stay_plain():
    tb = tokenize_batches(TEXTS, TOK, batch_size=3, max_length=32)
    b = next(iter(tb))
    assert torch.equal(b["labels"] != -100, b["attention_mask"].bool())
    ex = load_examples([{"question": "w1", "answer": "w2", "text": "w3 w4"}])
    assert ex == [Example("", "w3 w4")]  # a `text` field wins over the template, as documented


def test_training_labels_match_evaluation_scoring():
    """The positions unlearning scores for a QA record are exactly those the evaluation scores."""
    ex = load_examples(QA)  # the default "Question: {question}\nAnswer: {answer}" template
    tb = tokenize_batches(ex, TOK, batch_size=len(QA), max_length=64)
    enc = encode_items(TOK, [EvalItem(question=r["question"], answer=r["answer"]) for r in QA], PromptFormat())
    batch = next(iter(tb))
    for row, e in enumerate(enc):
        n = len(e.ids)
        assert batch["input_ids"][row, :n].tolist() == e.ids
        assert (batch["labels"][row] != -100).nonzero().flatten().tolist() == list(range(e.target_start, n))


def test_left_truncation_moves_the_label_start():
    tok = word_tokenizer()
    tok.truncation_side = "left"
    ex = [Example("w1 w2 w3 w4", " w5 w6")]
    tb = tokenize_batches(ex, tok, batch_size=1, max_length=4)
    b = next(iter(tb))
    assert b["input_ids"][0].tolist() == tok("w3 w4 w5 w6", add_special_tokens=False)["input_ids"]
    assert (b["labels"][0] != -100).tolist() == [False, False, True, True]
    with pytest.raises(BadInputError, match="loss_tokens"):
        tokenize_batches(ex, tok, batch_size=1, max_length=4, loss_tokens="prompt")


def test_forget_set_without_scored_positions_is_refused():
    model = tiny_model("qwen3_moe")
    # every record is a prompt whose answer is cut away by max_length: nothing left to score
    long_q = [{"question": " ".join(f"w{j}" for j in range(20)), "answer": "w70"}] * 3
    with pytest.raises(DataError, match="no scored token positions"):
        unlearn(model, long_q, tokenizer=TOK, method="ga", scope="full", steps=1, max_length=8, batch_size=2,
                progress=False)


def test_pairs_cover_every_batch_and_depend_on_the_seed():
    pairs = ForgetRetainPairs(5, 3, seed=0)
    for epoch in range(3):
        assert sorted(p["k"] for p in pairs(epoch)) == list(range(5))
    retain_used = [p["rk"] for e in range(3) for p in pairs(e)]  # 15 draws over 3 retain batches
    assert sorted(retain_used) == sorted([0, 1, 2] * 5)
    assert pairs(0) == ForgetRetainPairs(5, 3, seed=0)(0)
    assert any(ForgetRetainPairs(5, 3, seed=s)(0) != pairs(0) for s in (1, 2, 3))
    assert pairs(0) != pairs(1) or pairs(1) != pairs(2)  # the order changes across epochs


def _run(seed: int) -> dict[str, torch.Tensor]:
    model = tiny_model("qwen3_moe")
    unlearn(model, QA + TEXTS, TEXTS[::-1], tokenizer=TOK, method="npo", scope="full", steps=4, lr=5e-3,
            batch_size=3, max_length=16, seed=seed, progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_same_seed_is_bit_exact_other_seeds_differ():
    a, b, c = _run(0), _run(0), _run(7)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
