"""New tasks for the demo model, and how well a model does them: for the LoRAMoE example and benchmark.

The demo model (moe_unlearn.bench_model) knows fictitious facts. A new task it was never
trained on:

`new_domain_facts`: a new knowledge domain, ships, with invented names that no original
  entity has, four attributes and question templates the model has never seen ("What cargo
  does the ship Braelux carry?" -> "marble"); answers come from the facts' value pools, so the
  tokenizer knows them. Learnable in a few hundred steps by every fine-tuning method; scored
  by exact match on its questions (knowledge injection: the questions are the trained ones).
(A rule task, reversing word lists, was not learned by the small demo model in a few hundred
steps with any method, so the benchmark uses the new domain.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_unlearn.bench_model.facts import POOLS, Attribute, Fact, invent_names
from moe_unlearn.data import pad_batch

NEW_DOMAIN = "ships"
NEW_DOMAIN_SCHEMA: tuple[Attribute, ...] = (
    Attribute("cargo", "export", ("The ship {e} carries {a}.",), ("What cargo does the ship {e} carry?",)),
    Attribute("flag", "color", ("The flag of the ship {e} is {a}.",), ("What color is the flag of the ship {e}?",)),
    Attribute("stores", "diet", ("The crew of the ship {e} stores {a}.",),
              ("What food does the crew of the ship {e} store?",)),
    Attribute("music", "instrument", ("On the ship {e} the crew plays the {a}.",),
              ("Which instrument does the crew of the ship {e} play?",)),
)


def new_domain_facts(existing: Sequence[Fact], entities: int, *, seed: int = 1) -> list[Fact]:
    """Facts about `entities` new ships (4 each) whose names differ from every entity in `existing`.

    Deterministic for the same `existing` names and seed; the answers are drawn from POOLS.
    """
    rng = random.Random(f"new-domain-{seed}")
    names = invent_names(rng, entities, {f.entity for f in existing})
    out = []
    for name in names:
        for attr in NEW_DOMAIN_SCHEMA:
            answer = rng.choice(POOLS[attr.pool])
            out.append(Fact(id=f"{NEW_DOMAIN}/{name}/{attr.name}", domain=NEW_DOMAIN, entity=name,
                            attribute=attr.name, question=attr.questions[0].format(e=name), answer=answer,
                            text=attr.statements[0].format(e=name, a=answer), paraphrases=(),
                            question_paraphrases=()))
    return out


def prompt_response_exact_match(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                                batch_size: int = 64) -> float:
    """Fraction of records whose response (then eos) greedy decoding reproduces exactly after the prompt."""
    hits = prompt_response_hits(model, tokenizer, records, batch_size)
    return sum(hits) / len(hits) if hits else float("nan")


@torch.no_grad()
def prompt_response_hits(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                         batch_size: int = 64) -> list[bool]:
    """Per record: does greedy decoding after the prompt give exactly the response, then eos?

    Teacher forcing in one forward per batch: greedy decoding yields exactly the response and
    eos iff the argmax at every response position (given the true prefix) is the true token.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = tokenizer([r["prompt"] for r in chunk], add_special_tokens=False)["input_ids"]
        bodies = tokenizer([r["response"] for r in chunk], add_special_tokens=False)["input_ids"]
        seqs = [torch.tensor([*p, *b, eos]) for p, b in zip(prompts, bodies, strict=True)]
        batch = pad_batch(seqs, pad_token_id=pad)
        pred = model(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device)).logits.argmax(-1).cpu()
        for row, (p, seq) in enumerate(zip(prompts, seqs, strict=True)):
            hits.append(bool(torch.equal(pred[row, len(p) - 1:len(seq) - 1], seq[len(p):])))
    model.train(was_training)
    return hits


def fact_records(facts: Sequence[Any], type_label: str = "world") -> list[dict[str, Any]]:
    """Benchmark facts as QA prompt/response records (the form the demo model was trained on)."""
    return [{"prompt": f.prompt, "response": f.qa[len(f.prompt):], "type": type_label} for f in facts]


# -- word tasks the model's vocabulary already spells (the matched LoRAMoE benchmark) ---------------

WORD_TASKS = ("first", "last", "swap")


def word_task_records(n: int, *, seed: int = 0, type_label: str = "task",
                      exclude: set[tuple[str, tuple[str, ...]]] | None = None) -> list[dict[str, Any]]:
    """n distinct {"prompt", "response", "type", "task", "words"} records of three rule tasks over the
    answer words of the facts world (POOLS), so every token is one the model already reads and writes,
    while no record states a fact (no entity, no attribute):

    - first: "first: amber violin desert =" -> " amber";
    - last:  "last: amber violin desert =" -> " desert";
    - swap:  "swap: amber violin =" -> " violin amber".

    Every token is one the facts world already uses: an earlier version on digit strings (characters the
    facts never contain, so their embeddings and output rows stayed untrained) was learned by full
    fine-tuning only, never by an adapter. The (task,
    words) pairs are distinct and skip `exclude` (which is extended): splits drawn with one shared set
    are disjoint by input. Tasks are interleaved, so any prefix is balanced.
    """
    rng = random.Random(f"word-tasks-{seed}")
    words = sorted({w for pool in POOLS.values() for w in pool})
    seen = exclude if exclude is not None else set()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        task = WORD_TASKS[len(out) % len(WORD_TASKS)]
        picked = tuple(rng.sample(words, 2 if task == "swap" else 3))
        if (task, picked) in seen:
            continue
        seen.add((task, picked))
        answer = {"first": picked[0], "last": picked[-1], "swap": f"{picked[1]} {picked[0]}"}[task]
        out.append({"prompt": f"{task}: {' '.join(picked)} =", "response": " " + answer, "type": type_label,
                    "task": task, "words": list(picked)})
    return out
