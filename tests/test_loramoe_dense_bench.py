"""The pieces of the matched LoRAMoE benchmark: the word tasks state no fact, their answers follow the rule
and their splits are disjoint; the dense model builds through the shared loop, caches, and loads back identical."""

from __future__ import annotations

import torch

from moe_unlearn.bench_model import FactsConfig
from moe_unlearn.bench_model.dense import DenseBenchConfig, dense_cache_path, load_or_build_dense
from moe_unlearn.bench_model.facts import POOLS, generate_facts
from moe_unlearn.loramoe.demo_task import WORD_TASKS, word_task_records


def test_word_tasks_answers_disjoint_splits_and_no_facts():
    seen: set = set()
    train = word_task_records(300, seed=0, exclude=seen)
    val = word_task_records(60, seed=1, exclude=seen)
    key = lambda r: (r["task"], tuple(r["words"]))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert len({key(r) for r in train}) == 300
    assert {r["task"] for r in train} == set(WORD_TASKS)
    vocab = {w for pool in POOLS.values() for w in pool}
    for r in train + val:
        w = r["words"]
        assert set(w) <= vocab and len(set(w)) == len(w)
        want = {"first": w[0], "last": w[-1], "swap": f"{w[1]} {w[0]}"}[r["task"]]
        assert r["prompt"] == f"{r['task']}: {' '.join(w)} =" and r["response"] == " " + want
        assert r["type"] == "task"
    assert word_task_records(5, seed=0) == train[:5]  # deterministic
    world = generate_facts(FactsConfig(entities_per_domain=12, neighbor_entities=4, holdout_entities=6))
    entities = {f.entity for f in world.trained + world.holdout}
    assert not any(e in r["prompt"] for r in train for e in entities)  # no record names an entity


def test_dense_model_builds_caches_and_reloads(tmp_path):
    cfg = DenseBenchConfig(name="facts-dense-test", facts=FactsConfig(entities_per_domain=2, neighbor_entities=1,
                                                                        holdout_entities=1),
                           vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=24, steps=4, batch_size=8, extra_rounds=0)
    built = load_or_build_dense(cfg, cache_root=tmp_path, progress=False)
    assert built.built and built.path == dense_cache_path(cfg, tmp_path)
    assert built.model.config.model_type == "llama" and built.meta["steps"] == 4
    names = {n.rsplit(".", 1)[-1] for n, m in built.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"gate_proj", "up_proj", "down_proj"} <= names  # the FFN linears LoRAMoE targets
    again = load_or_build_dense(cfg, cache_root=tmp_path, progress=False)
    assert not again.built and [f.id for f in again.facts.trained] == [f.id for f in built.facts.trained]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, built.model(ids).logits)
