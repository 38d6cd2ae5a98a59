"""TOFU truth ratio, forget quality and model utility against hand-computed values, the bench
world's TOFU forms, and tofu_evaluate end to end on tiny models."""

import json
import math

import pytest
from test_eval_metrics import FMT, BigramStub, word_tokenizer

from moe_unlearn.bench_model.facts import SCHEMA, FactsConfig, generate_facts
from moe_unlearn.bench_model.tofu_forms import tofu_records
from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.eval.tofu import (
    TofuSplit,
    as_tofu_items,
    forget_quality,
    model_utility,
    tofu_evaluate,
    truth_ratio_score,
)
from moe_unlearn.testing import tiny_model

# BigramStub: p(b|q) = e^-0.6, p(c|b) = e^-0.6, p(a|q) = e^-1, p(c|a) = e^-0.5, p(d|q) = the rest / 6
P_D = (1 - math.exp(-1.0) - math.exp(-0.6)) / 6
RECORD = {"question": "q", "answer": "b c", "paraphrased_answer": "a c", "perturbed_answer": ["b c", "d"]}


def test_truth_ratio_probability_and_scores_by_hand():
    para = (-1.0 - 0.5) / 2  # mean token log-prob of "a c"
    perturbed = [(-0.6 - 0.6) / 2, math.log(P_D)]
    r = math.exp(sum(perturbed) / 2 - para)
    res = tofu_evaluate(BigramStub(), word_tokenizer(), forget=[RECORD], retain=[RECORD], utility={"wf": [RECORD]},
                        prompt_format=FMT, generate=False)
    assert res.forget.truth_ratios == [pytest.approx(r)]
    assert res.forget.truth_ratio == pytest.approx(min(r, 1 / r))
    assert res.utility["retain"].truth_ratio == pytest.approx(max(0.0, 1 - r))
    assert res.forget.probability == pytest.approx(math.exp(-0.6))  # answer "b c", absolute
    rel = math.exp(-0.6) / (math.exp(-0.6) + math.exp(-0.6) + P_D)  # answer vs perturbed, normalised
    assert res.utility["wf"].probability == pytest.approx(rel)
    assert res.utility["wf"].probability_mode == "relative" and res.forget_quality is None
    scores = [res.utility["retain"].probability, 1 - r, rel, 1 - r]
    assert res.model_utility == pytest.approx(len(scores) / sum(1 / s for s in scores))


def test_without_paraphrase_the_answer_is_the_true_side():
    rec = {"question": "q", "answer": "b c", "perturbed_answers": ["a c"]}  # TOFU's world-facts form
    res = tofu_evaluate(BigramStub(), word_tokenizer(), forget=[rec], prompt_format=FMT, generate=False)
    assert res.forget.truth_ratios == [pytest.approx(math.exp(-0.75 + 0.6))]


def test_forget_quality_is_the_ks_p_value():
    assert forget_quality([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    # two fully separated samples of 5: exact two-sided p = 2 / C(10, 5)
    assert forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    with pytest.raises(BadInputError):
        forget_quality([], [1.0])


def test_aggregators_and_harmonic_mean():
    assert truth_ratio_score([0.5, 2.0], forget=True) == pytest.approx(0.5)
    assert truth_ratio_score([0.5, 2.0], forget=False) == pytest.approx(0.25)
    split = TofuSplit(n=1, probability=0.5, probability_mode="absolute", truth_ratio=0.25,
                      truth_ratio_aggregator="true_better", rouge=1.0)
    assert model_utility([split]) == pytest.approx(3 / 7)
    split.rouge = 0.0
    assert model_utility([split]) == 0.0


def test_tofu_records_from_files_and_errors(tmp_path):
    path = tmp_path / "forget_perturbed.jsonl"
    path.write_text(json.dumps({**RECORD, "paraphrased_question": "ignored"}) + "\n")
    (item,) = as_tofu_items(path)
    assert item.perturbed_answers == ("b c", "d") and item.paraphrased_answer == "a c"
    with pytest.raises(DataError, match="perturbed_answer"):
        as_tofu_items([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="non-empty"):
        as_tofu_items([{"question": "q", "answer": "a", "perturbed_answer": []}])
    with pytest.raises(BadInputError, match="forget"):
        tofu_evaluate(BigramStub(), word_tokenizer(), retain=[RECORD], reference=[1.0], generate=False)


def test_bench_world_tofu_forms_are_deterministic_and_well_formed():
    facts = generate_facts(FactsConfig(entities_per_domain=6, neighbor_entities=3, holdout_entities=4))
    world = facts.trained
    recs = tofu_records(facts.forget, world, n_perturbed=3)
    assert recs == tofu_records(facts.forget, world, n_perturbed=3)
    assert recs != tofu_records(facts.forget, world, n_perturbed=3, seed=1)
    for fact, rec in zip(facts.forget, recs, strict=True):
        attr = next(a for a in SCHEMA[fact.domain] if a.name == fact.attribute)
        assert rec["paraphrased_answer"] == attr.statements[-1].format(e=fact.entity, a=fact.answer)
        assert len(rec["perturbed_answer"]) == 3 and len(set(rec["perturbed_answer"])) == 3
        assert rec["paraphrased_answer"] not in rec["perturbed_answer"]
        head = attr.statements[-1].split("{a}")[0].format(e=fact.entity)
        assert all(p.startswith(head) for p in rec["perturbed_answer"])
    with pytest.raises(BadInputError):
        tofu_records(facts.forget, world, n_perturbed=0)


def test_tofu_evaluate_end_to_end_with_reference_models():
    facts = generate_facts(FactsConfig(entities_per_domain=3, neighbor_entities=1, holdout_entities=2))
    tok = word_tokenizer_for(facts)
    forget, retain = tofu_records(facts.forget, facts.trained), tofu_records(facts.retain_train[:2], facts.trained)
    model, other = tiny_model("qwen3_moe", seed=0), tiny_model("qwen3_moe", seed=5)
    same = tofu_evaluate(model, tok, forget=forget, retain=retain, reference=model, max_new_tokens=2)
    assert same.forget_quality == pytest.approx(1.0)  # identical truth-ratio distributions
    assert 0 <= same.utility["retain"].rouge <= 1 and 0 <= same.model_utility <= 1
    diff = tofu_evaluate(model, tok, forget=forget, reference=other,
                         generate=False)
    assert 0 <= diff.forget_quality <= 1 and diff.reference_truth_ratios != diff.forget.truth_ratios
    again = tofu_evaluate(model, tok, forget=forget, reference=diff, generate=False)  # a TofuResult as reference
    assert again.forget_quality == pytest.approx(1.0)


def word_tokenizer_for(facts):
    """A word-level tokenizer over the world's words (the tiny model's vocabulary is 128 ids: unknown words
    share [UNK], which the truth ratio tolerates)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]"]
    for text in facts.all_texts():
        for w in text.replace("?", " ? ").replace(".", " . ").split():
            if w not in words and len(words) < 128:
                words.append(w)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
