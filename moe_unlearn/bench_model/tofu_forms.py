"""TOFU-style answer forms for the bench world's facts: a paraphrased answer and perturbed answers.

For a fact (entity e, attribute with statements S_1..S_m, answer a): the paraphrased answer is the
last statement form S_m filled with (e, a), a sentence the model was never asked to give as an
answer; each perturbed answer is the same sentence with another value of the attribute's pool
(`POOLS`, or the names of the trained entities of the domain the pool refers to). The values
are drawn without replacement by a random.Random seeded with (seed, fact id), so the records are
the same on every machine. The records carry TOFU's field names, so `moe_unlearn.eval.tofu`
reads them as it reads TOFU's jsonl files.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from moe_unlearn.bench_model.facts import POOLS, SCHEMA, Fact
from moe_unlearn.errors import BadInputError


def _attribute(fact: Fact):
    for attr in SCHEMA.get(fact.domain, ()):
        if attr.name == fact.attribute:
            return attr
    raise BadInputError(f"fact {fact.id}: no attribute {fact.attribute!r} in the schema of domain {fact.domain!r}")


def value_pool(fact: Fact, world: Sequence[Fact]) -> list[str]:
    """Every value the fact's attribute can take: its POOLS entry, or the entity names of the
    domain an "@domain" pool names (taken from `world`)."""
    pool = _attribute(fact).pool
    if pool.startswith("@"):
        return sorted({f.entity for f in world if f.domain == pool[1:]})
    return list(POOLS[pool])


def tofu_record(fact: Fact, world: Sequence[Fact], n_perturbed: int = 3, seed: int = 0) -> dict:
    """{question, answer, paraphrased_answer, perturbed_answer: [...], id} of one fact."""
    if n_perturbed < 1:
        raise BadInputError(f"n_perturbed must be >= 1, got {n_perturbed}")
    attr = _attribute(fact)
    template = attr.statements[-1]
    others = sorted(set(value_pool(fact, world)) - {fact.answer, fact.entity})
    if not others:
        raise BadInputError(f"fact {fact.id}: its value pool has no other value to perturb the answer with")
    rng = random.Random(f"{seed}:{fact.id}")
    values = rng.sample(others, min(n_perturbed, len(others)))
    return {"id": fact.id, "question": fact.question, "answer": fact.answer,
            "paraphrased_answer": template.format(e=fact.entity, a=fact.answer),
            "perturbed_answer": [template.format(e=fact.entity, a=v) for v in values]}


def tofu_records(facts: Sequence[Fact], world: Sequence[Fact] | None = None, n_perturbed: int = 3,
                 seed: int = 0) -> list[dict]:
    """TOFU records of `facts`; `world` (default: `facts`) supplies the entity names of "@domain" pools."""
    world = list(facts) if world is None else list(world)
    return [tofu_record(f, world, n_perturbed, seed) for f in facts]
