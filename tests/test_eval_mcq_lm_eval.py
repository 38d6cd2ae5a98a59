"""lm-eval's letter protocol for WMDP/MMLU by hand, and the lm-evaluation-harness bridge on a local task."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from moe_unlearn.eval import evaluate
from moe_unlearn.eval.items import McqItem
from moe_unlearn.eval.mcq import letters_prompt, mcq_accuracy
from moe_unlearn.testing import tiny_model

VOCAB = ["[PAD]", "[UNK]", "[EOS]", "A", "B", "C", "D", ".", "Answer", ":"] + [f"w{i}" for i in range(118)]
ID = {w: i for i, w in enumerate(VOCAB)}


def tokenizer():
    tk = Tokenizer(models.WordLevel(dict(ID), unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


class LastTokenStub(nn.Module):
    """Next-token log-probs depend on the last token only; after ":" p(B) = 0.5, p(A) = 0.2, p(C) = p(D) = 0.1;
    after "w1" p("w2") = e^-0.5, p("w3") = e^-2.0."""

    def __init__(self):
        super().__init__()
        table = torch.full((len(VOCAB), len(VOCAB)), 1e-4)
        table[ID[":"], [ID["A"], ID["B"], ID["C"], ID["D"]]] = torch.tensor([0.2, 0.5, 0.1, 0.1])
        table[ID["w1"], ID["w2"]], table[ID["w1"], ID["w3"]] = math.exp(-0.5), math.exp(-2.0)
        self.table = nn.Parameter((table / table.sum(-1, keepdim=True)).log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


RECORDS = [{"question": "w1 w5", "choices": ["w2", "w3", "w4", "w6"], "answer": "B"},
           {"question": "w7", "choices": ["w8", "w9", "w10", "w11"], "answer": 1},
           {"question": "w1", "choices": ["w2", "w3", "w4", "w6"], "answer": "A"}]


def test_letters_prompt_is_lm_evals_wmdp_format():
    item = McqItem(" What is w1? ", ("w2", "w3", "w4", "w6"), 0)
    assert letters_prompt(item) == "What is w1?\nA. w2\nB. w3\nC. w4\nD. w6\nAnswer:"
    assert letters_prompt(item, "About w.\n\n").startswith("About w.\n\nWhat is w1?\nA. w2")


def test_letters_vs_cloze_by_hand():
    stub, tok = LastTokenStub(), tokenizer()
    letters = mcq_accuracy(stub, tok, RECORDS, protocol="letters")
    assert letters.accuracy == pytest.approx(2 / 3)  # the letter after ":" is always B; answers B, B, A
    assert letters.accuracy_norm == letters.accuracy == letters.accuracy_bytes  # one-character options
    cloze = mcq_accuracy(stub, tok, RECORDS, template="{question}", protocol="cloze")
    # cloze after "w1": w2 wins (-0.5 vs -2.0) -> record 3 right, record 1 wrong; record 2 all equal -> choice 0
    assert cloze.accuracy == pytest.approx(1 / 3)
    assert (letters.protocol, cloze.protocol) == ("letters", "cloze")


def test_evaluate_reports_both_protocols():
    rep = evaluate(LastTokenStub(), tokenizer(), mcq=RECORDS, progress=False)
    assert rep.mcq.protocol == "cloze" and rep.mcq_letters.accuracy == pytest.approx(2 / 3)
    assert "lm-eval letters A-D" in rep.to_markdown()


def test_lm_eval_bridge_on_a_local_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from moe_unlearn.eval.lm_eval_bridge import run_lm_eval, write_mcq_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    model, tok = tiny_model("qwen3_moe", seed=3), tokenizer()
    gen = torch.Generator().manual_seed(0)
    records = []
    for i in range(12):
        words = [f"w{int(x)}" for x in torch.randint(10, 118, (6,), generator=gen)]
        records.append({"question": " ".join(words[:2]), "choices": words[2:], "answer": i % 4})
    src = tmp_path / "mcq.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = tmp_path / "tasks"
    write_mcq_task(tasks, "local_mcq", src)
    res = run_lm_eval(model, tok, ["local_mcq"], include_path=tasks, batch_size=4)
    ours = mcq_accuracy(model, tok, src, protocol="letters")
    assert res["local_mcq"]["acc"] == pytest.approx(ours.accuracy)
    assert res["local_mcq"]["acc_norm"] == pytest.approx(ours.accuracy_norm)
    rep = evaluate(model, tok, mcq=src, lm_eval_tasks=["local_mcq"], lm_eval_include_path=str(tasks),
                   progress=False)
    assert rep.lm_eval["local_mcq"]["acc"] == pytest.approx(ours.accuracy)
    assert rep.summary()["lm_eval.local_mcq.acc"] == pytest.approx(ours.accuracy)
