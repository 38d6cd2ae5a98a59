"""The fictitious-facts generator, its tokenizer and the cached benchmark model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from moe_unlearn.bench_model import (
    BenchModelConfig,
    FactsConfig,
    answer_exact_match,
    bench_config,
    cache_path,
    generate_facts,
    load_or_build,
    train_tokenizer,
)
from moe_unlearn.bench_model.build import encode_with_eos
from moe_unlearn.bench_model.facts import SCHEMA, FactSet
from moe_unlearn.data import load_records
from moe_unlearn.errors import BadInputError

SMALL = FactsConfig(entities_per_domain=10, neighbor_entities=4, holdout_entities=5)


def _entities(facts):
    return {(f.domain, f.entity) for f in facts}


def test_generator_is_deterministic_for_a_seed():
    a, b = generate_facts(SMALL), generate_facts(SMALL)
    assert {s: [f.to_record() for f in v] for s, v in a.splits.items()} == \
           {s: [f.to_record() for f in v] for s, v in b.splits.items()}
    c = generate_facts(FactsConfig(**{**SMALL.to_dict(), "seed": 1, "domains": SMALL.domains}))
    assert [f.entity for f in c.forget] != [f.entity for f in a.forget]


@pytest.mark.parametrize("forget_entities", [None, 3])
def test_splits_are_disjoint_by_entity_and_text(forget_entities):
    cfg = FactsConfig(entities_per_domain=10, neighbor_entities=4, holdout_entities=5,
                      forget_entities=forget_entities)
    fs = generate_facts(cfg)
    names = ("forget", "retain_train", "utility", "neighbor", "holdout")
    for i, s in enumerate(names):
        assert fs.splits[s], s
        for t in names[i + 1:]:
            assert not _entities(fs.splits[s]) & _entities(fs.splits[t]), (s, t)
            texts_s = {x for f in fs.splits[s] for x in f.training_texts()}
            texts_t = {x for f in fs.splits[t] for x in f.training_texts()}
            assert not texts_s & texts_t, (s, t)
    n_attr = len(SCHEMA[cfg.forget_domain])
    assert len(fs.forget) == n_attr * (forget_entities or cfg.entities_per_domain)
    assert len(_entities(fs.neighbor)) == cfg.neighbor_entities
    assert len(_entities(fs.holdout)) == cfg.holdout_entities
    # every trained entity is in exactly one of forget / retain_train / utility / neighbor
    assert len(fs.trained) == len(cfg.domains) * cfg.entities_per_domain * n_attr
    # retain_train and utility each cover every domain that has entities left after forget/neighbor
    rest_domains = {f.domain for f in fs.retain_train + fs.utility}
    assert {f.domain for f in fs.retain_train} == rest_domains == {f.domain for f in fs.utility}
    # the retrained reference's corpus is everything trained but the forget split
    ref = set(fs.training_texts(exclude=("forget",)))
    assert ref == set(fs.training_texts()) - {t for f in fs.forget for t in f.training_texts()}
    with pytest.raises(BadInputError):
        fs.training_texts(exclude=("holdout",))


def test_holdout_never_appears_in_training_texts():
    fs = generate_facts(SMALL)
    corpus = " ".join(fs.training_texts())
    for entity in {f.entity for f in fs.holdout}:
        assert entity not in corpus
    assert all(f.domain == SMALL.forget_domain for f in fs.holdout)


def test_neighbors_are_close_to_the_forget_facts():
    fs = generate_facts(SMALL)  # domain mode: neighbors come from other domains and share answer values
    forget_answers = {f.answer for f in fs.forget}
    assert all(f.domain != SMALL.forget_domain for f in fs.neighbor)
    per_entity = {}
    for f in fs.neighbor:
        per_entity[f.entity] = per_entity.get(f.entity, 0) + (f.answer in forget_answers)
    assert all(n >= 1 for n in per_entity.values())
    sub = generate_facts(FactsConfig(entities_per_domain=10, neighbor_entities=4, forget_entities=3))
    assert {f.domain for f in sub.neighbor} == {sub.config.forget_domain}  # entity mode: same domain


def test_fact_forms_end_with_the_answer():
    fs = generate_facts(SMALL)
    for f in fs.trained + fs.holdout:
        assert f.text.rstrip(".").endswith(f.answer)
        assert f.qa == f"Question: {f.question}\nAnswer: {f.answer}"
        assert f.qa.startswith(f.prompt) and f.prompt.endswith("Answer:")
        assert f.entity in f.question and f.answer not in f.question


@pytest.mark.parametrize("bad", [dict(forget_domain="planets"), dict(domains=("people", "compounds")),
                                 dict(forget_entities=10), dict(entities_per_domain=1), dict(holdout_entities=0),
                                 dict(utility_fraction=0.0), dict(utility_fraction=1.0)])
def test_bad_facts_config_is_rejected(bad):
    with pytest.raises(BadInputError):
        generate_facts(FactsConfig(**{**SMALL.to_dict(), "domains": SMALL.domains, **bad}))


def test_jsonl_round_trip_and_readable_by_data_loader(tmp_path):
    fs = generate_facts(SMALL)
    paths = fs.write_jsonl(tmp_path)
    back = FactSet.read_jsonl(tmp_path, SMALL)
    assert back.splits == fs.splits
    recs = load_records(paths["forget"], required=("question", "answer", "text"))
    assert [r["answer"] for r in recs] == [f.answer for f in fs.forget]
    assert not list(tmp_path.glob(".*"))


def test_tokenizer_round_trips_the_corpus(tmp_path):
    fs = generate_facts(SMALL)
    tok = train_tokenizer(fs.all_texts(), vocab_size=512)
    assert len(tok) <= 512
    texts = fs.all_texts()
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert [tok.decode(x) for x in ids] == texts
    # invented names become few tokens, and no special token is added behind the caller's back
    lengths = [len(tok(" " + f.answer, add_special_tokens=False)["input_ids"]) for f in fs.trained]
    assert sum(lengths) / len(lengths) < 3
    assert tok("abc")["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts[:50], add_special_tokens=False)["input_ids"] == ids[:50]
    assert (again.pad_token_id, again.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert again.pad_token_id != again.eos_token_id


def test_tokenizer_rejects_bad_input():
    with pytest.raises(BadInputError):
        train_tokenizer([], 512)
    with pytest.raises(BadInputError):
        train_tokenizer(["abc"], 100)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench = load_or_build(BenchModelConfig.quick(), cache_root=root, progress=False)
    return root, bench


def test_build_writes_a_complete_cache_entry_and_reuses_it(quick_bench):
    root, bench = quick_bench
    cfg = BenchModelConfig.quick()
    assert bench.built and bench.path == cache_path(cfg, root)
    meta = json.loads((bench.path / "bench_meta.json").read_text())
    assert meta["digest"] == cfg.digest() and meta["config"]["facts"]["seed"] == cfg.facts.seed
    assert meta["split_sizes"] == {s: len(v) for s, v in bench.facts.splits.items()}
    assert 0.0 <= meta["exact_match"]["trained"] <= 1.0 and meta["train_seconds"] > 0
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    again = load_or_build(cfg, cache_root=root)
    assert not again.built
    assert again.facts.splits == bench.facts.splits
    for (n, p), (_, q) in zip(bench.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_config_change_gives_another_cache_entry(tmp_path):
    a, b = BenchModelConfig.quick(), BenchModelConfig.quick()
    b.steps += 1
    assert cache_path(a, tmp_path) != cache_path(b, tmp_path)
    assert cache_path(a, tmp_path) == cache_path(BenchModelConfig.quick(), tmp_path)


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_UNLEARN_CACHE", str(tmp_path))
    assert cache_path(BenchModelConfig.quick()).parent == tmp_path


def test_teacher_forced_exact_match_equals_greedy_generation(quick_bench):
    _, bench = quick_bench
    model, tok = bench.model, bench.tokenizer
    facts = bench.facts.trained[:24]
    per_fact = [answer_exact_match(model, tok, [f]) for f in facts]
    assert answer_exact_match(model, tok, facts) == pytest.approx(sum(per_fact) / len(facts))
    for f, hit in zip(facts, per_fact, strict=True):
        prompt = torch.tensor([tok(f.prompt, add_special_tokens=False)["input_ids"]])
        want = encode_with_eos([f.qa], tok)[0][prompt.shape[1]:]
        out = model.generate(prompt, max_new_tokens=len(want), do_sample=False, pad_token_id=tok.pad_token_id)
        got = out[0, prompt.shape[1]:]
        assert bool(torch.equal(got, want)) == bool(hit), f.id


def test_quick_model_learns_something(quick_bench):
    """The model is trained on the facts: trained facts are far more often right than never-seen ones."""
    _, bench = quick_bench
    em = bench.meta["exact_match"]
    assert em["trained"] > em["holdout"] + 0.2


def test_rebuild_retrains_to_the_same_weights(quick_bench):
    root, bench = quick_bench
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_or_build(BenchModelConfig.quick(), cache_root=root, rebuild=True, progress=False)
    assert again.built and again.path == bench.path
    for (n, p), (_, q) in zip(bench.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # training is deterministic for the config's seed
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_undertrained_model_warns_with_the_number(tmp_path):
    cfg = BenchModelConfig.quick()
    cfg.steps = 3
    with pytest.warns(UserWarning, match=r"knows only \d+\.\d% of its trained facts"):
        bench = load_or_build(cfg, cache_root=tmp_path, progress=False)
    assert not bench.meta["reached_target"] and bench.meta["exact_match"]["trained"] < cfg.target_em


def test_bench_model_registry_and_presets():
    natural, localized = bench_config("natural"), bench_config("localized")
    # the natural model is shaped like the fine-grained MoEs: >= 6 layers, 16-64 experts, top-K >= 4, a shared
    # expert, a balancing loss; no localization
    assert natural.num_layers >= 6 and 16 <= natural.num_experts <= 64 and natural.top_k >= 4
    assert natural.family == "qwen2_moe" and natural.shared_expert_intermediate_size > 0
    assert natural.router_aux_loss_coef > 0 and not natural.localized
    # the routing control differs from the one-phase recipe (allparam) only by the localization loss, in a
    # middle layer; natural is two-phase (reading on another world first) and has no localization or implant
    allparam = bench_config("allparam")
    diff = {k for k, v in allparam.to_dict().items() if localized.to_dict()[k] != v}
    assert diff == {"name", "localize_layer"} and 0 < localized.localize_layer < localized.num_layers - 1
    assert natural.two_phase and not allparam.two_phase and not natural.implanted
    implanted = bench_config("implanted")
    assert implanted.implanted and 0 < implanted.implant_layer < implanted.num_layers - 1
    # natural stores this world's facts in the routed experts of the middle layers only; implanted is built
    # on the reference of the earlier two-phase recipe (every layer's MoE blocks learn)
    assert natural.store_layers == (2, 3, 4) and not natural.store_shared
    assert implanted.retrained().digest() == BenchModelConfig.moe_blocks().retrained().digest()
    ref = bench_config("natural", retrained=True)
    assert ref.exclude_forget and ref.digest() != natural.digest() and ref.name == "natural-retrained"
    with pytest.raises(BadInputError):
        bench_config("dense")
    with pytest.raises(BadInputError):
        load_or_build(BenchModelConfig(top_k=40), cache_root="/nonexistent")


def test_localization_loss_pulls_forget_tokens_and_pushes_the_rest():
    from moe_unlearn.bench_model.build import localization_loss

    logits = torch.zeros(4, 3)
    logits[0, 1] = logits[2, 1] = 5.0  # tokens 0 and 2 already route to expert 1
    in_f = torch.tensor([True, False, False, True])
    mask = torch.tensor([1, 1, 1, 0])  # token 3 is padding
    p = torch.softmax(logits, -1)[:, 1]
    want = (-torch.log(p[0]) - torch.log(1 - p[1]) - torch.log(1 - p[2])) / 3
    assert localization_loss(logits, in_f, mask, 1).item() == pytest.approx(want.item(), rel=1e-5)


def test_quick_localized_and_retrained_builds(tmp_path):
    """The control routes its forget domain to the designated expert; the reference never saw the forget split."""
    from moe_unlearn.attribution import attribute_experts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loc = load_or_build(bench_config("localized", quick=True), cache_root=tmp_path, progress=False)
        ref = load_or_build(bench_config("natural", quick=True, retrained=True), cache_root=tmp_path, progress=False)
    cfg = loc.meta["config"]
    forget = [f.text for f in loc.facts.forget]
    retain = [f.text for f in loc.facts.retain_train]
    attr = attribute_experts(loc.model, forget, tokenizer=loc.tokenizer, retain=retain, progress=False)
    row = attr.layers.index(cfg["localize_layer"])
    e = cfg["localize_expert"]
    assert attr.frequency[row, e] > 0.9 and attr.selectivity[row, e] > 2.0
    assert ref.meta["exact_match"]["forget"] <= ref.meta["exact_match"]["holdout"] + 0.25
    assert ref.meta["num_training_texts"] == len(ref.facts.training_texts(exclude=("forget",)))
