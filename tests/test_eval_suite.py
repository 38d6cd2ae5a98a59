"""evaluate() end to end on a tiny random Qwen3-MoE, the report files, and the CLI."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval import EvalReport, PromptFormat, evaluate, record_routing
from moe_unlearn.eval.generation import greedy_generate
from moe_unlearn.eval.items import as_items
from moe_unlearn.eval.scoring import encode_items, score_encoded
from moe_unlearn.testing import tiny_model

WORDS = ["[PAD]", "[UNK]", "[EOS]", "Question", ":", "Answer"] + [f"w{i}" for i in range(122)]  # 128 = vocab


def word_tokenizer():
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


FORGET = [{"question": "w1 w2 w3", "answer": "w4 w5"}, {"question": "w6", "answer": "w7 w8 w9"},
          {"text": "w10 w11 w12 w13 w14 w15 w16 w17"}]
RETAIN = [{"question": "w20 w21", "answer": "w22"}, {"text": "w30 w31 w32 w33 w34"}]
HOLDOUT = ["w40 w41 w42 w43", "w50 w51 w52 w53", "w60 w61 w62 w63 w64"]  # >= 3 scored tokens: MUSE's Min-40% keeps int(0.4 n) >= 1
MCQ = [{"question": "w1 w2", "choices": ["w3", "w4 w5", "w6", "w7"], "answer": "B"},
       {"question": "w8", "choices": ["w9", "w10"], "answer": 0}]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe")


def perturb_router(m, layer_pos=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = find_moe_layers(m)[layer_pos].router.weight
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=gen) * 3.0)


def test_evaluate_against_itself(model, tmp_path):
    tok = word_tokenizer()
    neighbor = [{"question": "w70", "answer": "w71", "text": "w70 w72 w71 w73 w74"}]  # QA with a statement
    rep = evaluate(model, tok, forget=FORGET, retain=RETAIN, holdout=HOLDOUT, mcq=MCQ, original=model,
                   extra_splits={"neighbor": neighbor}, target=(1, 3), reference_auc=0.5, batch_size=2,
                   max_new_tokens=8, verbmem_max_new_tokens=8, progress=False)
    assert set(rep.splits) == {"forget", "retain", "holdout", "neighbor"}
    nb = rep.splits["neighbor"]
    assert (nb.n_qa, nb.n_text) == (1, 0) and nb.exact_match is not None and 0 <= nb.verbmem <= 100
    for s in rep.splits.values():
        assert s.nll > 0 and 0 <= s.token_accuracy <= 1
    f = rep.splits["forget"]
    assert (f.n_qa, f.n_text) == (2, 1)
    assert 0 <= f.exact_match <= 1 and 0 <= f.rouge_l <= 100 and 0 <= f.verbmem <= 100
    assert rep.splits["holdout"].exact_match is None and rep.splits["holdout"].rouge_l is None
    assert all(0 <= a <= 1 for a in rep.mia.auc.values()) and set(rep.mia.privleak) == set(rep.mia.auc)
    assert 0 <= rep.mcq.accuracy <= 1 and rep.mcq.chance == pytest.approx((0.25 + 0.5) / 2)
    for name, r in rep.routing.items():
        assert r.layers == [0, 1]
        assert r.overlap == [1.0, 1.0] and r.kl == [0.0, 0.0], name
        assert all(0 < e <= m + 1e-9 for e, m in zip(r.load_entropy, r.max_entropy, strict=True))
    fr = rep.routing["forget"]
    assert fr.target == (1, 3) and fr.target_gate_mass == fr.target_gate_mass_original
    assert 0 <= fr.target_gate_mass <= 1
    assert fr.n_tokens == sum(len(e.ids) for e in encode_items(tok, as_items(FORGET)))
    assert rep.examples["forget"][0]["question"] == "w1 w2 w3"

    flat = rep.summary()
    assert flat["forget.exact_match"] == f.exact_match and flat["routing.retain.overlap"] == 1.0
    assert flat["mia.auc.min_k"] == rep.mia.auc["min_k"] and "holdout.exact_match" not in flat
    assert flat["routing.forget.target_gate_mass"] == fr.target_gate_mass

    paths = rep.write_all(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md",
                                                                     "routing_overlap.png"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvalReport.from_json(paths["json"]).to_dict() == json.loads(paths["json"].read_text())
    md = paths["markdown"].read_text()
    assert "| forget | 3 |" in md and "| min_k_pp |" in md


def test_recorded_original_routing_matches_original_model_and_localises_a_change(model):
    tok = word_tokenizer()
    edited = copy.deepcopy(model)
    recs = {"forget": record_routing(model, tok, FORGET), "retain": record_routing(model, tok, RETAIN)}
    perturb_router(edited, layer_pos=1)
    a = evaluate(edited, tok, forget=FORGET, retain=RETAIN, original_routing=recs, generate=False, progress=False)
    b = evaluate(edited, tok, forget=FORGET, retain=RETAIN, original=model, generate=False, progress=False)
    for split in ("forget", "retain"):
        ra, rb = a.routing[split], b.routing[split]
        assert ra.overlap == rb.overlap and ra.kl == rb.kl
        assert ra.overlap[0] == 1.0 and ra.kl[0] == 0.0  # layer 0's router and inputs are unchanged
        assert ra.overlap[1] < 1.0 and ra.kl[1] > 0.0


def test_batching_and_padding_do_not_change_results(model):
    tok = word_tokenizer()
    enc = encode_items(tok, as_items(FORGET + RETAIN), PromptFormat())
    batched = score_encoded(model, tok, enc, batch_size=5, record_routing=True)
    single = [score_encoded(model, tok, [e], batch_size=1, record_routing=True) for e in enc]
    for b, s in zip(batched.items, single, strict=True):
        assert torch.allclose(b.logp, s.items[0].logp, atol=1e-5)
    assert torch.equal(batched.routing.topk_idx[1], torch.cat([s.routing.topk_idx[1] for s in single]))
    prompts = [e.ids[: e.target_start] for e in enc]
    together = greedy_generate(model, tok, prompts, 6, batch_size=5, progress=False)
    assert together == [greedy_generate(model, tok, [p], 6, batch_size=1, progress=False)[0] for p in prompts]


def test_greedy_generate_limits_and_eos_cut(model):
    from types import SimpleNamespace

    prompt = [6, 7, 8]
    full = greedy_generate(model, SimpleNamespace(pad_token_id=0, eos_token_id=None), [prompt], 6, progress=False)[0]
    assert len(full) == 6
    short = greedy_generate(model, SimpleNamespace(pad_token_id=0, eos_token_id=None), [prompt, prompt], [2, 6],
                            progress=False)
    assert short == [full[:2], full]
    stop = full[2]
    assert stop not in full[:2]  # (seed 0) so the continuation must stop right before position 2
    cut = greedy_generate(model, SimpleNamespace(pad_token_id=0, eos_token_id=stop), [prompt], 6, progress=False)
    assert cut == [full[:2]]


def test_bad_inputs_fail_before_any_work(model):
    tok = word_tokenizer()
    rec = record_routing(model, tok, RETAIN)
    with pytest.raises(BadInputError, match="different tokens"):
        evaluate(model, tok, forget=FORGET, original_routing={"forget": rec}, generate=False, progress=False)
    with pytest.raises(BadInputError, match="not both"):
        evaluate(model, tok, forget=FORGET, original=model, original_routing={"forget": rec}, progress=False)
    with pytest.raises(BadInputError, match="not given"):
        evaluate(model, tok, forget=FORGET, original_routing={"holdout": rec}, progress=False)
    with pytest.raises(BadInputError, match="nothing to evaluate"):
        evaluate(model, tok)
    with pytest.raises(BadInputError, match="clashes"):
        evaluate(model, tok, forget=FORGET, extra_splits={"forget": RETAIN})


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r if isinstance(r, dict) else {"text": r}) + "\n" for r in records))
    return path


def test_cli_with_patch_writes_all_reports(model, tmp_path):
    from moe_unlearn.unlearning.patch import PatchEntry, snapshot, write_patch

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    edited = copy.deepcopy(model)
    entry = PatchEntry(find_moe_layers(edited)[1].param_name(find_moe_layers(edited)[1].router.weight))
    originals = snapshot(edited, [entry])
    perturb_router(edited, layer_pos=1)
    write_patch(tmp_path / "patch", edited, [entry], originals, {"method": "test"})

    files = {n: _write_jsonl(tmp_path / f"{n}.jsonl", d) for n, d in
             (("forget", FORGET), ("retain", RETAIN), ("holdout", HOLDOUT), ("mcq", MCQ))}
    args = ["evaluate", "--model", str(model_dir), "--patch", str(tmp_path / "patch"),
            "--forget", str(files["forget"]), "--retain", str(files["retain"]), "--holdout", str(files["holdout"]),
            "--mcq", str(files["mcq"]), "--target", "1:2", "--max-new-tokens", "4", "--verbmem-max-new-tokens", "4",
            "--quiet"]
    bad = tmp_path / "bad_out"
    assert main(args + ["--split", f"neighbor={tmp_path / 'missing.jsonl'}", "--out", str(bad)]) == 2
    assert not bad.exists()

    out = tmp_path / "out"
    assert main(args + ["--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "routing_overlap.png"]
    rep = json.loads((out / "report.json").read_text())
    routing = rep["routing"]["forget"]
    assert routing["overlap"][0] == 1.0 and routing["overlap"][1] < 1.0
    assert routing["target"] == [1, 2]
    assert 0 <= rep["mcq"]["accuracy"] <= 1 and set(rep["mia"]["auc"]) == {"loss", "zlib", "min_k", "min_k_pp"}
    assert 0 <= rep["mcq_letters"]["accuracy"] <= 1 and rep["meta"]["convention"]["name"] == "muse"


@pytest.mark.gpu
def test_evaluate_on_cuda_matches_cpu(model):
    tok = word_tokenizer()
    cpu = evaluate(model, tok, forget=FORGET, holdout=HOLDOUT, original=model, generate=False, progress=False)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = evaluate(gpu_model, tok, forget=FORGET, holdout=HOLDOUT, original=gpu_model, max_new_tokens=4,
                   progress=False)
    assert gpu.splits["forget"].nll == pytest.approx(cpu.splits["forget"].nll, rel=1e-3)
    assert gpu.routing["forget"].overlap == [1.0, 1.0]
    assert gpu.mia.auc["loss"] == pytest.approx(cpu.mia.auc["loss"])
