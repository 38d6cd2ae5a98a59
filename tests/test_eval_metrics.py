"""Split quality metrics (NLL, token accuracy, exact match, ROUGE-L), MCQ and item parsing,
on a stub bigram model whose next-token distribution is fixed by hand."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.eval import EvalItem, PromptFormat, as_items, as_mcq_items, evaluate, mcq_accuracy, rouge_l
from moe_unlearn.eval.metrics import cut_at_stop, rouge_l_recall

VOCAB = ["[PAD]", "[UNK]", "[EOS]", "q", "a", "b", "c", "d"]
ID = {w: i for i, w in enumerate(VOCAB)}


def word_tokenizer():
    tk = Tokenizer(models.WordLevel(dict(ID), unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _row(**probs):
    rest = (1.0 - sum(probs.values())) / (len(VOCAB) - len(probs))
    return [probs.get(w, rest) for w in VOCAB]


class BigramStub(nn.Module):
    """logits[t] depend only on token t: p(a|q) = e^-1, p(b|q) = e^-0.6, p(c|b) = e^-0.6, p(c|a) = e^-0.5."""

    def __init__(self):
        super().__init__()
        rows = [_row() for _ in VOCAB]
        rows[ID["q"]] = _row(a=math.exp(-1.0), b=math.exp(-0.6))
        rows[ID["b"]] = _row(c=math.exp(-0.6))
        rows[ID["a"]] = _row(c=math.exp(-0.5))
        self.table = nn.Parameter(torch.tensor(rows).log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


FMT = PromptFormat(template="{question}", answer_prefix=" ")


def test_nll_accuracy_exact_match_on_planted_model():
    forget = [{"question": "q", "answer": "b c"},  # both answer tokens are the argmax: nll 0.6, acc 1, EM 1
              {"question": "q", "answer": "a c"},  # a is not the argmax after q: nll 0.75, acc 0.5, EM 0
              "q b c"]                              # a text item: nll 0.6, acc 1
    stub = BigramStub().train()
    rep = evaluate(stub, word_tokenizer(), forget=forget, prompt_format=FMT, generate=False, progress=False)
    assert stub.training  # evaluation runs in eval mode and restores the caller's mode
    s = rep.splits["forget"]
    assert (s.n_items, s.n_qa, s.n_text) == (3, 2, 1)
    assert s.nll == pytest.approx((0.6 + 0.75 + 0.6) / 3, abs=1e-5)
    assert s.token_accuracy == pytest.approx((1 + 0.5 + 1) / 3)
    assert s.exact_match == pytest.approx(0.5)
    assert s.rouge_l is None and s.verbmem is None  # generation off
    assert rep.mia is None and rep.routing == {}


def test_mia_through_evaluate_on_planted_model():
    # two scored tokens per text: MUSE's int(n * 0.4) keeps none, so this uses open-unlearning's max(1, .)
    rep = evaluate(BigramStub(), word_tokenizer(), forget=["q b c", "q a c"], holdout=["q d d", "d d q"],
                   prompt_format=FMT, generate=False, progress=False, reference_auc=0.5,
                   convention="open-unlearning")
    assert rep.mia.auc["loss"] == 1.0 and rep.mia.auc["min_k"] == 1.0
    assert rep.mia.privleak["loss"] == pytest.approx(-100.0)
    assert rep.mia.mean_forget["loss"] == pytest.approx((0.6 + 0.75) / 2, abs=1e-5)


def test_mcq_sum_vs_length_normalised(tmp_path):
    # option "a": sum -1.0, mean -1.0; option "b c": sum -1.2, mean -0.6; "d"/"c" after q: far less likely
    records = [{"question": "q", "choices": ["a", "b c"], "answer": "B"},
               {"question": "q", "choices": ["a", "b c"], "answer": 0},
               {"question": "q", "choices": ["a", "b c"], "answer": "a"},
               {"question": "q", "choices": ["a", "b c", "d", "c"], "answer": "0"}]
    path = tmp_path / "mcq.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    res = mcq_accuracy(BigramStub(), word_tokenizer(), path, template="{question}")
    assert res.n == 4
    assert res.accuracy == pytest.approx(3 / 4)  # the sum always picks "a"
    assert res.accuracy_norm == pytest.approx(1 / 4)  # per byte (-1.0 vs -1.2 / 3) always picks "b c"
    assert res.chance == pytest.approx((0.5 * 3 + 0.25) / 4)


def test_mcq_record_errors():
    with pytest.raises(DataError, match="out of range"):
        as_mcq_items([{"question": "q", "choices": ["a", "b"], "answer": "C"}])
    with pytest.raises(DataError, match="missing"):
        as_mcq_items([{"question": "q", "answer": 0}])
    with pytest.raises(DataError, match="at least 2"):
        as_mcq_items([{"question": "q", "choices": ["a"], "answer": 0}])


def test_rouge_l_hand_values():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: F1 = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(500 / 6)
    # LCS 2: precision 2/4, recall 2/2 -> F1 = 2/3
    assert rouge_l("alpha beta gamma delta", "alpha gamma") == pytest.approx(200 / 3)
    assert rouge_l_recall("alpha beta gamma delta", "alpha gamma") == pytest.approx(100.0)
    assert rouge_l("", "alpha") == 0.0


def test_cut_at_stop():
    assert cut_at_stop("Paris\nQuestion: next", ["\n"]) == "Paris"
    assert cut_at_stop("a b. c", [".", " c"]) == "a b"
    assert cut_at_stop("abc", []) == "abc"


def test_items_from_jsonl_txt_and_lists(tmp_path):
    jl = tmp_path / "f.jsonl"
    jl.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n\n" + json.dumps({"text": "q b"}) + "\n")
    assert as_items(jl) == [EvalItem(question="q", answer="a"), EvalItem(text="q b")]
    txt = tmp_path / "f.txt"
    txt.write_text("one text\n\nanother\n")
    assert [i.text for i in as_items(txt)] == ["one text", "another"]
    assert as_items([{"prompt": "p", "completion": "c"}]) == [EvalItem(question="p", answer="c")]
    both = as_items([{"question": "q", "answer": "a", "text": "q is a", "domain": "x"}])
    assert both == [EvalItem(question="q", answer="a", text="q is a")] and both[0].is_qa
    with pytest.raises(DataError):
        as_items([{"title": "no usable field"}])
    with pytest.raises(DataError):
        as_items([])
    with pytest.raises(DataError):
        as_items(tmp_path / "missing.jsonl")
    with pytest.raises(DataError):
        EvalItem(question="q", answer=" ")
    with pytest.raises(DataError):
        EvalItem(question="q", text="t")


def test_prompt_format_from_data_template():
    fmt = PromptFormat.from_template("Q: {question}\nA: {answer}")
    assert (fmt.template, fmt.answer_prefix) == ("Q: {question}\nA:", " ")
    with pytest.raises(BadInputError):
        PromptFormat.from_template("{answer} then {question}")
