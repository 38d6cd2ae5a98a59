"""moe_unlearn.data: sources, field rules, errors, padding and truncation."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.data import load_records, load_texts, pad_token_id, tokenize_batches
from moe_unlearn.errors import BadInputError, DataError


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_list_and_txt(tmp_path):
    assert load_texts(["a b", "c"]) == ["a b", "c"]
    p = tmp_path / "d.txt"
    p.write_text("first doc\n\n   \nsecond doc\n", encoding="utf-8")
    assert load_texts(p) == ["first doc", "second doc"]
    assert load_texts(str(p), limit=1) == ["first doc"]


def test_jsonl_field_rules(tmp_path):
    p = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello", "question": "q"}, {"text": "world"}])
    assert load_texts(p) == ["hello", "world"]
    qa = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "Who?", "answer": "Ann"}, {"question": "Q2", "answer": "A2"}])
    assert load_texts(qa) == ["Question: Who?\nAnswer: Ann", "Question: Q2\nAnswer: A2"]
    assert load_texts(qa, template="{question} -> {answer}") == ["Who? -> Ann", "Q2 -> A2"]
    assert load_texts(qa, field="answer") == ["Ann", "A2"]


def test_jsonl_missing_field_names_file_line_and_fields(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"body": "no text here", "id": 3}\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_texts(p)
    msg = str(exc.value)
    assert "bad.jsonl line 3" in msg and "'body'" in msg and "'id'" in msg
    with pytest.raises(DataError, match="no field 'content'"):
        load_texts(p, field="content")


def test_dataset_dir(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"question": ["q1", "q2"], "answer": ["a1", "a2"], "body": ["b1", "b2"]}).save_to_disk(
        str(tmp_path / "ds"))
    assert load_texts(tmp_path / "ds", field="body") == ["b1", "b2"]
    assert load_texts(tmp_path / "ds")[1] == "Question: q2\nAnswer: a2"
    recs = load_records(tmp_path / "ds", required=("question", "answer"))
    assert recs[0] == {"question": "q1", "answer": "a1", "body": "b1"}
    with pytest.raises(DataError, match="row 0: missing field"):
        load_records(tmp_path / "ds", required=("type",))


@pytest.mark.parametrize("make", [
    lambda d: [],
    lambda d: ["", "  "],
    lambda d: (d / "empty.txt").write_text("\n\n") and d / "empty.txt",
    lambda d: d / "missing.jsonl",
    lambda d: d / "data.csv",
    lambda d: (d / "notjson.jsonl").write_text("{oops\n") and d / "notjson.jsonl",
    lambda d: (d / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and d / "bin.txt",
    lambda d: (d / "nodataset").mkdir() or d / "nodataset",
])
def test_bad_sources_raise_data_error(tmp_path, make):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError):
        load_texts(make(tmp_path))


def test_non_string_text_and_bad_limit():
    with pytest.raises(DataError, match="item 0: the text field holds a int"):
        load_texts([{"text": 5}])
    with pytest.raises(BadInputError):
        load_texts(["a"], limit=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenize_batches_padding_and_labels(side):
    tok = word_tokenizer()
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10", "w11 w12"]
    batches = tokenize_batches(texts, tok, batch_size=3, max_length=4, padding_side=side)
    assert batches.num_truncated == 1 and batches.num_texts == 4 and len(batches) == 2
    assert batches.num_tokens == 3 + 1 + 4 + 2
    first, second = list(batches)
    assert first["input_ids"].shape == (3, 4) and second["input_ids"].shape == (1, 2)
    for b in (first, second):
        # every valid id comes back in order, padding is masked and labelled -100
        assert torch.equal(b["labels"] == -100, b["attention_mask"] == 0)
        assert torch.equal(b["labels"][b["attention_mask"] == 1], b["input_ids"][b["attention_mask"] == 1])
    row1 = first["input_ids"][1]
    mask1 = first["attention_mask"][1]
    expected_mask = [1, 0, 0, 0] if side == "right" else [0, 0, 0, 1]
    assert mask1.tolist() == expected_mask
    assert row1[mask1 == 1].tolist() == tok("w4")["input_ids"]
    assert row1[mask1 == 0].tolist() == [tok.pad_token_id] * 3
    # the truncated text keeps its first max_length tokens
    assert first["input_ids"][2].tolist() == tok("w5 w6 w7 w8")["input_ids"]
    assert list(batches)[0]["input_ids"].equal(first["input_ids"])  # re-iterable


def test_tokenizer_without_pad_uses_eos_and_is_not_mutated():
    tok = word_tokenizer(with_pad=False)
    assert tok.pad_token is None
    batch = next(iter(tokenize_batches(["w1 w2", "w3"], tok, batch_size=2, max_length=8)))
    assert batch["input_ids"][1, 1].item() == tok.eos_token_id
    assert batch["attention_mask"][1].tolist() == [1, 0]
    assert tok.pad_token is None and pad_token_id(tok) == tok.eos_token_id


def test_tokenize_batches_bad_arguments():
    tok = word_tokenizer()
    with pytest.raises(BadInputError):
        tokenize_batches(["w1"], tok, batch_size=0, max_length=4)
    with pytest.raises(BadInputError):
        tokenize_batches(["w1"], tok, batch_size=1, max_length=4, padding_side="middle")
    with pytest.raises(BadInputError):
        tokenize_batches("w1 w2", tok, batch_size=1, max_length=4)
