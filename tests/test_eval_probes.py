"""Is it erased or hidden? Routing replay, the relearning probe, paraphrase/completion probes and
expert ablation, each on a planted case."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.errors import BadInputError, UnsupportedFamily
from moe_unlearn.eval import evaluate, record_routing
from moe_unlearn.eval.items import as_items
from moe_unlearn.eval.relearn import RelearnConfig, relearn_probe, split_indices
from moe_unlearn.eval.replay import RoutingReplay, score_replayed
from moe_unlearn.eval.scoring import PromptFormat, encode_items, score_encoded
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import apply_patch, revert_patch, unlearn

TOK = word_tokenizer()


def _greedy_facts(model, n: int = 12) -> list[dict[str, str]]:
    """QA records whose answer is the model's own greedy next word: forget EM 1.0 by construction
    (the same 40 questions for every model)."""
    out = []
    for i in range(40):
        q = f"w{i} w{(i * 7 + 3) % 60} w{(i * 11 + 5) % 60}"
        ids = encode_items(TOK, as_items([{"question": q, "answer": "w0"}]))[0].ids[:-1]
        with torch.no_grad():
            top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        word = TOK.convert_ids_to_tokens(top)
        if word.startswith("w"):
            out.append({"question": q, "answer": word})
        if len(out) == n:
            break
    assert len(out) == n or n == 40
    return out


@pytest.fixture(scope="module")
def planted():
    """An original model, its greedy 'facts', and a copy unlearned by its routers alone (GA)."""
    original = tiny_model("qwen3_moe", seed=3)
    facts = _greedy_facts(original)
    routed = copy.deepcopy(original)
    unlearn(routed, facts, tokenizer=TOK, method="ga", scope="routers", steps=10, lr=0.3, batch_size=4,
            progress=False)
    return original, facts, routed


def test_replay_undoes_forgetting_done_by_the_routers(planted):
    original, facts, routed = planted
    rec = record_routing(original, TOK, facts, batch_size=5)
    rep = evaluate(routed, TOK, forget=facts, original_routing={"forget": rec}, replay="original",
                   batch_size=4, generate=False, progress=False)  # another batch size than the recording
    base = evaluate(original, TOK, forget=facts, generate=False, progress=False).splits["forget"]
    assert base.exact_match == 1.0
    forgot = rep.splits["forget"]
    assert forgot.exact_match < 1.0 and forgot.nll > base.nll  # the routers alone made it forget
    assert rep.splits["forget_replay"].exact_match == 1.0  # ... and the original routing brings it all back
    assert rep.splits["forget_replay"].nll == pytest.approx(base.nll, abs=1e-5)  # only routers changed


def test_replay_of_an_untouched_model_changes_nothing(planted):
    original, facts, _ = planted
    twin = copy.deepcopy(original)
    for gates in ("original", "current"):
        rep = evaluate(twin, TOK, forget=facts, original=original, replay=gates, batch_size=3, generate=False,
                       progress=False)
        assert rep.splits["forget_replay"].exact_match == rep.splits["forget"].exact_match
        assert rep.splits["forget_replay"].nll == pytest.approx(rep.splits["forget"].nll, abs=1e-5)


def test_replay_with_current_gates_keeps_the_current_gate_values(planted):
    """Forced experts, the unlearned router's (renormalised) scores: differs from original-gate replay."""
    original, facts, routed = planted
    enc = encode_items(TOK, as_items(facts))
    rec = score_encoded(original, TOK, enc, record_routing=True).routing
    cur = score_replayed(routed, TOK, enc, rec, gates="current")
    again = score_encoded(routed, TOK, enc, record_routing=True)
    # routed replayed on its own routing with current gates = itself
    same = score_replayed(routed, TOK, enc, again.routing, gates="current")
    assert all(torch.allclose(a.logp, b.logp, atol=1e-5) for a, b in zip(same.items, again.items, strict=True))
    orig = score_replayed(routed, TOK, enc, rec, gates="original")
    assert any(not torch.allclose(a.logp, b.logp, atol=1e-4) for a, b in zip(cur.items, orig.items, strict=True))


def test_replay_refuses_mismatched_input(planted):
    original, facts, routed = planted
    rec = record_routing(original, TOK, facts)
    with pytest.raises(BadInputError, match="fingerprints differ"):
        score_replayed(routed, TOK, encode_items(TOK, as_items(facts[:-1])), rec)
    with pytest.raises(BadInputError, match="replay needs"):
        evaluate(routed, TOK, forget=facts, replay="original", generate=False, progress=False)
    with pytest.raises(BadInputError, match="replay must be"):
        evaluate(routed, TOK, forget=facts, original_routing={"forget": rec}, replay="both", generate=False,
                 progress=False)
    enc = encode_items(TOK, as_items(facts))
    with pytest.raises(BadInputError, match="not item"), RoutingReplay(routed, rec, enc):
        score_encoded(routed, TOK, list(reversed(enc)))


def test_replay_refuses_a_router_that_returns_logits_only():
    model = tiny_model("dbrx")
    enc = encode_items(TOK, as_items(["w1 w2 w3"]))
    rec = score_encoded(model, TOK, enc, record_routing=True).routing
    with pytest.raises(UnsupportedFamily, match="cannot replace"):
        score_replayed(model, TOK, enc, rec)


def test_completion_split_scores_prefix_plus_answer_without_template(planted):
    original, facts, _ = planted
    comp = [{"question": f["question"], "answer": f["answer"]} for f in facts]
    rep = evaluate(original, TOK, completion=comp, generate=False, progress=False)
    enc = encode_items(TOK, as_items(comp), PromptFormat(template="{question}", answer_prefix=" "))
    assert enc[0].ids[: enc[0].target_start] == TOK(facts[0]["question"])["input_ids"]  # no "Question:" around it
    from moe_unlearn.eval.metrics import split_metrics

    want = split_metrics(score_encoded(original, TOK, enc).items, [True] * len(enc))
    assert rep.splits["completion"].exact_match == want.exact_match
    assert rep.splits["completion"].nll == pytest.approx(want.nll)


def test_bench_paraphrase_and_completion_records_are_unseen_forms():
    from moe_unlearn.bench_model import (
        completion_records,
        generate_facts,
        paraphrase_records,
        unlearning_records,
    )
    from moe_unlearn.bench_model.facts import completion_prompt

    facts = generate_facts().forget[:20]
    seen = {r.get("question") for r in unlearning_records(facts)} | {r.get("text") for r in unlearning_records(facts)}
    para, comp = paraphrase_records(facts), completion_records(facts)
    assert len(para) == len(comp) == len(facts)
    for f, p, c in zip(facts, para, comp, strict=True):
        assert p["answer"] == c["answer"] == f.answer and p["question"] not in seen
        assert c["question"] + " " + f.answer in f.paraphrases[0] and c["question"] not in seen
    assert completion_prompt("The founder of Ablo was Kim Ro.", "Kim Ro") == "The founder of Ablo was"
    with pytest.raises(Exception, match="cannot cut"):
        completion_prompt("Kim Ro founded it.", "Kim Ro")


# -- relearning ---------------------------------------------------------------------------------

def test_relearning_curves_of_a_model_that_knows_and_one_that_never_did(planted):
    """The original keeps its held facts while fine-tuning (steps to half = 0); a model that never
    knew them (another random init) does not get there in the budget: censored."""
    original, facts, _ = planted
    train_idx, held_idx = split_indices(len(facts), 0.25, seed=0)
    assert len(train_idx) == 3 and sorted(train_idx + held_idx) == list(range(len(facts)))
    cfg = RelearnConfig(steps=4, eval_every=2, lr=1e-5, batch_size=3)  # too small a step to learn anything
    stranger = tiny_model("qwen3_moe", seed=11)
    strange = _greedy_facts(stranger, 40)
    held = [f for f in (facts[i] for i in held_idx) if f not in strange]  # the stranger does not know these
    assert held
    before = [p.detach().clone() for p in original.parameters()]
    res = relearn_probe({"original": original, "reference": stranger}, TOK, [facts[i] for i in train_idx], held,
                        cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, original.parameters(), strict=True))  # a copy trained
    assert res.curves["original"].steps == [0, 2, 4]
    assert res.level == pytest.approx(0.5)  # half of the original's 1.0
    assert res.steps_to_half["original"] == 0
    assert res.curves["reference"].em[-1] < 0.5 and res.steps_to_half["reference"] is None
    d = res.to_dict()
    assert d["reference_censored"] and d["relative_to_reference"]["original"] == 0.0
    # relearning moves the weights toward the fine-tuned facts: their own NLL falls on the stranger
    tuned = relearn_probe({"reference": stranger}, TOK, [facts[i] for i in train_idx],
                          [facts[i] for i in train_idx], RelearnConfig(steps=4, eval_every=2, lr=3e-3, batch_size=3),
                          level=0.5)
    assert tuned.curves["reference"].nll[-1] < tuned.curves["reference"].nll[0]


def test_relearn_config_is_checked():
    with pytest.raises(BadInputError, match="fraction"):
        RelearnConfig(fraction=1.0).validate()
    with pytest.raises(BadInputError, match="at least 2"):
        split_indices(1, 0.5, 0)


# -- ablation -----------------------------------------------------------------------------------

def test_ablate_zeroes_the_down_projection_as_a_reversible_patch(tmp_path, planted):
    original, facts, _ = planted
    model = copy.deepcopy(original)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = unlearn(model, facts, tokenizer=TOK, method="ablate", scope="uoe", target=(1, 2), out_dir=tmp_path / "p",
                  progress=False)
    layer = find_moe_layers(model)[1]
    x = torch.randn(5, model.config.hidden_size)
    assert torch.count_nonzero(layer.expert_forward(2, x)) == 0  # expert 2 adds nothing any more
    assert torch.allclose(layer.expert_forward(3, x), find_moe_layers(original)[1].expert_forward(3, x))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == [layer.experts_path + ".down_proj"] and res.trainable_params == 0
    revert_patch(model, res.patch_path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    apply_patch(model, res.patch_path)
    assert torch.count_nonzero(layer.expert_forward(2, x)) == 0
    with pytest.raises(BadInputError, match="uoe or topm"):
        unlearn(copy.deepcopy(original), facts, tokenizer=TOK, method="ablate", scope="full", progress=False)
