"""QA records through the tokenizer's chat template: training (moe_unlearn.data) and evaluation
(moe_unlearn.eval) build the same tokens, on the API and on the CLI."""

from __future__ import annotations

import json

import pytest
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.cli import main
from moe_unlearn.data import CHAT_TEMPLATE, chat_parts, load_examples, tokenize_batches
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.items import EvalItem
from moe_unlearn.eval.scoring import PromptFormat, encode_items
from moe_unlearn.testing import tiny_model

# user turn "w90 <question> w91", assistant header "w92", end of turn <eos>: a chat layout in the test vocabulary
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}w90 {{ m['content'] }} w91"
        "{% else %} w92 {{ m['content'] }} <eos>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} w92{% endif %}")
QA = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 40} w{i + 41}"} for i in range(6)]


def chat_tokenizer():
    tok = word_tokenizer()
    tok.chat_template = CHAT
    return tok


def test_chat_split_is_the_templates_own():
    tok = chat_tokenizer()
    prompt, completion = chat_parts(tok, "w1 w2", "w3")
    assert prompt == "w90 w1 w2 w91 w92" and completion == " w3 <eos>"
    full = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}],
                                   tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)[
        "input_ids"] == list(full)


def test_trained_answer_tokens_are_the_evaluated_ones():
    tok = chat_tokenizer()
    examples = load_examples(QA, template=CHAT_TEMPLATE, tokenizer=tok)
    assert all(not e.special_tokens for e in examples)
    tb = tokenize_batches(examples, tok, batch_size=1, max_length=64)
    enc = encode_items(tok, [EvalItem(question=r["question"], answer=r["answer"]) for r in QA],
                       PromptFormat.from_template(CHAT_TEMPLATE))
    for batch, e in zip(tb, enc, strict=True):
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
        assert ids == e.ids
        trained = [t for t, lab in zip(ids, labels.tolist(), strict=True) if lab != -100]
        assert trained == e.ids[e.target_start:]  # the answer and the end-of-turn token, nothing of the prompt
        assert trained[-1] == tok.eos_token_id and tok.convert_tokens_to_ids("w92") not in trained
    # the plain template gives other tokens (so the test above can fail)
    plain = tokenize_batches(load_examples(QA), tok, batch_size=1, max_length=64)
    assert next(iter(plain))["input_ids"][0].tolist() != enc[0].ids


def test_chat_template_errors_are_clear():
    with pytest.raises(BadInputError, match="no chat template"):
        load_examples(QA, template=CHAT_TEMPLATE, tokenizer=word_tokenizer())
    with pytest.raises(BadInputError, match="needs the tokenizer"):
        load_examples(QA, template=CHAT_TEMPLATE)
    # plain-text records stay plain under the chat template
    assert load_examples(["w1 w2"], template=CHAT_TEMPLATE, tokenizer=chat_tokenizer())[0].prompt == ""


def test_cli_unlearn_and_evaluate_share_the_chat_template(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in QA[:4]))
    retain.write_text("".join(json.dumps(r) + "\n" for r in QA[4:]))
    runs = {}
    for name, flags in (("chat", ["--chat-template"]), ("plain", [])):
        out = tmp_path / name
        assert main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain),
                     "--target", "1:2", "--steps", "2", "--lr", "1e-2", "--out", str(out), "--quiet",
                     "--device", "cpu", *flags]) == 0
        runs[name] = json.loads((out / "patch.json").read_text())
    assert runs["chat"]["config"]["template"] == "chat" and runs["plain"]["config"]["template"] is None
    assert runs["chat"]["entries"][0]["new_sha256"] != runs["plain"]["entries"][0]["new_sha256"]
    # evaluate --patch takes the template and the target from patch.json
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model_dir), "--patch", str(tmp_path / "chat"), "--forget", str(forget),
                 "--retain", str(retain), "--out", str(ev), "--no-generate", "--quiet", "--device", "cpu",
                 "--max-new-tokens", "8"]) == 0
    report = json.loads((ev / "report.json").read_text())
    assert report["meta"]["verbmem_max_new_tokens"] == 8 == report["meta"]["max_new_tokens"]  # one bound for both
    before = report["meta"]["before_patch"]
    assert set(before) == {"forget", "retain"} and before["forget"]["nll"] != report["splits"]["forget"]["nll"]
    assert "forget: exact match" in capsys.readouterr().out
    assert report["meta"]["prompt_template"] == "{question}" and report["meta"].get("chat_template") is True
    assert report["meta"]["target"] == [1, 2]
