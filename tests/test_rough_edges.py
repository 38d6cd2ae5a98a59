"""Small fixes found by trying the toolkit as a new user: loramoe takes question/answer records, the
PremiseWarning names only the failing criterion, inspect takes the model flags."""

from __future__ import annotations

import warnings

import pytest
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.attribution import PREMISE_MIN_COVERAGE, PremiseWarning, attribute_experts
from moe_unlearn.cli import main
from moe_unlearn.loramoe.finetune import encode_records
from moe_unlearn.testing import tiny_model


def test_loramoe_reads_question_answer_like_every_command():
    tok = word_tokenizer()
    qa = encode_records([{"question": "w1 w2", "answer": "w3 w4"}], tok, 32)[0]
    pair = encode_records([{"prompt": "Question: w1 w2\nAnswer:", "response": " w3 w4"}], tok, 32)[0]
    assert qa.ids.tolist() == pair.ids.tolist() and qa.num_prompt == pair.num_prompt > 0


def test_premise_warning_names_only_what_failed():
    tok = word_tokenizer()
    forget = [" ".join(f"w{(i * 3 + j) % 30}" for j in range(10)) for i in range(12)]
    retain = [" ".join(f"w{(i * 5 + j) % 30}" for j in range(10)) for i in range(12)]
    attr = attribute_experts(tiny_model("olmoe"), forget, tokenizer=tok, retain=retain, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prem = attr.premise()
    msgs = [str(w.message) for w in caught if issubclass(w.category, PremiseWarning)]
    if prem.holds:
        assert not msgs
        pytest.skip("the premise happens to hold on this random model")
    (msg,) = msgs
    if prem.coverage >= PREMISE_MIN_COVERAGE:  # then the selectivity failed: the message says which is which
        assert f"coverage {prem.coverage:.2f} is enough, but selectivity" in msg and "is below 2.0" in msg
    else:
        assert f"coverage {prem.coverage:.2f} of the forget tokens is below {PREMISE_MIN_COVERAGE}" in msg


def test_inspect_takes_the_model_flags(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(model_dir)
    assert main(["inspect", str(model_dir), "--load-weights", "--device", "cpu", "--json"]) == 0
    assert '"family": "olmoe"' in capsys.readouterr().out
    assert main(["inspect", str(model_dir), "--device", "nonsense"]) == 2
    assert "unknown device" in capsys.readouterr().err
