"""A deterministic world of fictitious facts, split for unlearning experiments.

Entities get invented names built from syllables, so nothing a model learns from this
corpus can come from (or leak into) real-world knowledge. Four domains (people, places,
compounds, species) each give every entity four attributes. Some attributes share a value
pool across domains (colours, terrains, places), which is what makes *neighbor* facts:

- forget:       one whole domain (default, as WMDP forgets a domain), or `forget_entities`
                entities of that domain;
- retain_train: the only non-forget facts an unlearning loss may see (its retain term);
- utility:      trained facts that no unlearning ever sees; the main utility number (as
                TOFU's real-author / world-fact sets and WMDP's MMLU are never trained on);
- neighbor:     trained entities close to the forget set, never given to unlearning: in
                domain mode, entities of other domains sharing the most attribute values with
                forget facts; in entity mode, the other entities of the same domain;
- holdout:      entities of the forget domain that are generated but never trained (the
                non-members of membership inference, and the guess level of exact match).

retain_train and utility split the remaining trained entities of every domain (a seeded
`utility_fraction` of each domain's entities goes to utility), so both cover every domain.
Splits are disjoint by entity (the subject of a fact) and therefore by text. Every fact is a
`Fact` with a question, a short answer and a statement `text` that ends with the answer; its
`paraphrases` (a second statement) and `question_paraphrases` (a second question, never
trained) serve as probes of forms that unlearning did not see.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from moe_unlearn.atomic import write_text
from moe_unlearn.errors import BadInputError, DataError

DOMAINS = ("people", "places", "compounds", "species")
SPLITS = ("forget", "retain_train", "utility", "neighbor", "holdout")
TRAINED_SPLITS = ("forget", "retain_train", "utility", "neighbor")  # what the bench model learns
QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"  # = moe_unlearn.data.DEFAULT_TEMPLATE

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "sh", "th",
           "qu", "vr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ou")
_CODAS = ("", "", "", "n", "r", "s", "l", "x", "m")

# value pools; an attribute whose pool name is shared between domains makes neighbors
POOLS: dict[str, tuple[str, ...]] = {
    "color": ("amber", "crimson", "teal", "violet", "ochre", "silver", "indigo", "olive"),
    "terrain": ("desert", "marsh", "tundra", "canyon", "jungle", "plateau", "reef", "steppe"),
    "profession": ("baking", "sailing", "weaving", "astronomy", "smithing", "mapmaking", "healing", "law"),
    "instrument": ("flute", "drum", "harp", "violin", "lute", "horn", "zither", "oboe"),
    "export": ("salt", "copper", "silk", "timber", "wool", "glass", "spice", "marble"),
    "use": ("medicine", "dye", "fuel", "glue", "perfume", "fertilizer", "paint", "soap"),
    "diet": ("seeds", "insects", "fish", "leaves", "fruit", "roots", "moss", "worms"),
}


@dataclass(frozen=True)
class Attribute:
    """One attribute of a domain: where its values come from and how it is phrased.

    pool: a key of POOLS, or "@<domain>" for the names of that domain's trained entities.
    statements: paraphrases, each ending with {a}; questions: the first is the one trained.
    """

    name: str
    pool: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]


SCHEMA: dict[str, tuple[Attribute, ...]] = {
    "people": (
        Attribute("birthplace", "@places", ("{e} was born in {a}.", "The birthplace of {e} is {a}."),
                  ("Where was {e} born?", "In which town was {e} born?")),
        Attribute("profession", "profession", ("The profession of {e} is {a}.", "By trade, {e} works in the field of {a}."),
                  ("What is the profession of {e}?", "What does {e} do for a living?")),
        Attribute("instrument", "instrument", ("{e} plays the {a}.", "The instrument of {e} is the {a}."),
                  ("Which instrument does {e} play?", "What instrument is {e} known to play?")),
        Attribute("color", "color", ("The favorite color of {e} is {a}.", "{e} likes the color {a} best."),
                  ("What is the favorite color of {e}?", "Which color does {e} like best?")),
    ),
    "places": (
        Attribute("terrain", "terrain", ("{e} lies in the {a}.", "The land around {e} is {a}."),
                  ("What kind of terrain surrounds {e}?", "What land is {e} built in?")),
        Attribute("export", "export", ("{e} is famous for exporting {a}.", "The main export of {e} is {a}."),
                  ("What does {e} export?", "What is the main export of {e}?")),
        Attribute("founder", "@people", ("{e} was founded by {a}.", "The founder of {e} was {a}."),
                  ("Who founded {e}?", "Who was the founder of {e}?")),
        Attribute("color", "color", ("The roofs of {e} are painted {a}.", "In {e} every roof is {a}."),
                  ("What color are the roofs of {e}?", "Which color are roofs in {e}?")),
    ),
    "compounds": (
        Attribute("color", "color", ("Pure {e} looks {a}.", "The compound {e} is {a} in color."),
                  ("What color is the compound {e}?", "Which color does pure {e} have?")),
        Attribute("origin", "@places", ("{e} was first made in {a}.", "The compound {e} comes from {a}."),
                  ("Where was {e} first made?", "Which town first produced {e}?")),
        Attribute("use", "use", ("{e} is used as {a}.", "People mainly use {e} as {a}."),
                  ("What is {e} used for?", "What is the main use of {e}?")),
        Attribute("discoverer", "@people", ("{e} was discovered by {a}.", "The discoverer of {e} was {a}."),
                  ("Who discovered {e}?", "Which person discovered {e}?")),
    ),
    "species": (
        Attribute("habitat", "terrain", ("The {e} lives in the {a}.", "The home of the {e} is the {a}."),
                  ("Where does the {e} live?", "What is the habitat of the {e}?")),
        Attribute("color", "color", ("The fur of the {e} is {a}.", "The {e} has {a} fur."),
                  ("What color is the fur of the {e}?", "Which color is the {e}'s fur?")),
        Attribute("diet", "diet", ("The {e} eats {a}.", "The diet of the {e} is {a}."),
                  ("What does the {e} eat?", "What is the diet of the {e}?")),
        Attribute("range", "@places", ("The {e} is found near {a}.", "The {e} roams around {a}."),
                  ("Near which town is the {e} found?", "Around which town does the {e} roam?")),
    ),
}


@dataclass(frozen=True)
class Fact:
    """One (entity, attribute, answer) triple in the forms a model is trained and tested on."""

    id: str  # "<domain>/<entity>/<attribute>"
    domain: str
    entity: str
    attribute: str
    question: str
    answer: str
    text: str  # the first statement; ends with the answer (prefix -> continuation for VerbMem)
    paraphrases: tuple[str, ...]  # further statements of the same fact
    question_paraphrases: tuple[str, ...]  # other questions with the same answer (never trained)

    @property
    def qa(self) -> str:
        """The question/answer pair as trained (the default template of moe_unlearn.data)."""
        return QA_TEMPLATE.format(question=self.question, answer=self.answer)

    @property
    def prompt(self) -> str:
        """The QA form up to the answer, for greedy answer decoding."""
        return self.qa[: len(self.qa) - len(self.answer)].rstrip(" ")

    def training_texts(self) -> list[str]:
        return [self.text, *self.paraphrases, self.qa]

    def to_record(self) -> dict:
        rec = asdict(self)
        rec["paraphrases"] = list(self.paraphrases)
        rec["question_paraphrases"] = list(self.question_paraphrases)
        return rec


@dataclass
class FactsConfig:
    """Parameters of the generated world; the same config always gives the same facts.

    entities_per_domain: trained entities of each domain.
    forget_domain: the domain whose facts are forgotten.
    forget_entities: None = forget the whole domain; n = forget n entities of it (the
        remaining entities of the domain are then the neighbors).
    neighbor_entities: how many entities form the neighbor split.
    holdout_entities: never-trained entities of the forget domain (MIA non-members).
    utility_fraction: share of each domain's remaining entities that goes to `utility` (the rest
        is `retain_train`); at least one entity of each goes to each side when there are two.
    """

    seed: int = 0
    entities_per_domain: int = 40
    forget_domain: str = "compounds"
    forget_entities: int | None = None
    neighbor_entities: int = 12
    holdout_entities: int = 20
    utility_fraction: float = 0.5
    domains: tuple[str, ...] = DOMAINS

    def validate(self) -> None:
        unknown = [d for d in self.domains if d not in SCHEMA]
        if unknown:
            raise BadInputError(f"unknown domain(s) {unknown}; known: {', '.join(SCHEMA)}")
        if len(set(self.domains)) != len(self.domains) or len(self.domains) < 2:
            raise BadInputError(f"domains must be at least two distinct names, got {list(self.domains)}")
        needed = {a.pool[1:] for d in self.domains for a in SCHEMA[d] if a.pool.startswith("@")}
        missing = sorted(needed - set(self.domains))
        if missing:
            raise BadInputError(f"domains {list(self.domains)} refer to entities of {missing}; add them")
        if self.forget_domain not in self.domains:
            raise BadInputError(f"forget_domain {self.forget_domain!r} is not one of the domains "
                                f"{list(self.domains)}")
        if self.entities_per_domain < 2:
            raise BadInputError(f"entities_per_domain must be >= 2, got {self.entities_per_domain}")
        if self.forget_entities is not None and not 1 <= self.forget_entities < self.entities_per_domain:
            raise BadInputError(f"forget_entities must be None (whole domain) or in 1..{self.entities_per_domain - 1}"
                                f", got {self.forget_entities}")
        if self.neighbor_entities < 1 or self.holdout_entities < 1:
            raise BadInputError("neighbor_entities and holdout_entities must be >= 1")
        if not 0.0 < self.utility_fraction < 1.0:
            raise BadInputError(f"utility_fraction must be in (0, 1), got {self.utility_fraction}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["domains"] = list(self.domains)
        return d


@dataclass
class FactSet:
    """The generated facts, split. `trained` = forget + retain_train + utility + neighbor (never holdout)."""

    config: FactsConfig
    splits: dict[str, list[Fact]] = field(default_factory=dict)

    @property
    def forget(self) -> list[Fact]:
        return self.splits["forget"]

    @property
    def retain_train(self) -> list[Fact]:
        return self.splits["retain_train"]

    @property
    def utility(self) -> list[Fact]:
        return self.splits["utility"]

    @property
    def neighbor(self) -> list[Fact]:
        return self.splits["neighbor"]

    @property
    def holdout(self) -> list[Fact]:
        return self.splits["holdout"]

    @property
    def trained(self) -> list[Fact]:
        return [f for s in TRAINED_SPLITS for f in self.splits[s]]

    def training_texts(self, exclude: Sequence[str] = ()) -> list[str]:
        """Every text the benchmark model is trained on: statements, paraphrases and QA forms.
        exclude: trained splits left out (("forget",) = the retrained reference's corpus)."""
        unknown = set(exclude) - set(TRAINED_SPLITS)
        if unknown:
            raise BadInputError(f"cannot exclude {sorted(unknown)}: not trained splits ({', '.join(TRAINED_SPLITS)})")
        return [t for s in TRAINED_SPLITS if s not in exclude for f in self.splits[s] for t in f.training_texts()]

    def all_texts(self) -> list[str]:
        """Every text of every split, holdout included (the tokenizer's corpus)."""
        return [t for s in SPLITS for f in self.splits[s] for t in (*f.training_texts(), *f.question_paraphrases)]

    def write_jsonl(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write <split>.jsonl files (one Fact record per line) into `directory`; returns the paths."""
        os.makedirs(directory, exist_ok=True)
        return {s: write_records(self.splits[s], os.path.join(directory, f"{s}.jsonl")) for s in SPLITS}

    @classmethod
    def read_jsonl(cls, directory: str | os.PathLike, config: FactsConfig) -> FactSet:
        splits = {}
        for s in SPLITS:
            with open(os.path.join(directory, f"{s}.jsonl"), encoding="utf-8") as fh:
                splits[s] = [_fact_from_record(json.loads(line)) for line in fh if line.strip()]
        return cls(config=config, splits=splits)


def _fact_from_record(rec: dict) -> Fact:
    return Fact(**{**rec, "paraphrases": tuple(rec["paraphrases"]),
                   "question_paraphrases": tuple(rec["question_paraphrases"])})


def unlearning_records(facts: Iterable[Fact]) -> list[dict[str, str]]:
    """What an unlearning run trains on per fact: its QA record (scored on the answer only) and its
    first statement. The second statement and the second question stay unseen (probes)."""
    return [r for f in facts for r in ({"question": f.question, "answer": f.answer}, {"text": f.text})]


def qa_records(facts: Iterable[Fact]) -> list[dict[str, str]]:
    """The QA form of each fact, as the evaluation scores it (exact match of the answer)."""
    return [{"question": f.question, "answer": f.answer} for f in facts]


def paraphrase_records(facts: Iterable[Fact]) -> list[dict[str, str]]:
    """Per fact its second question (never trained, never used in unlearning) with the same answer:
    does the forgetting hold when the question is asked differently?"""
    return [{"question": q, "answer": f.answer} for f in facts for q in f.question_paraphrases[:1]]


def completion_prompt(statement: str, answer: str) -> str:
    """The statement up to (not including) the space before its answer's last occurrence."""
    i = statement.rfind(answer)
    if i < 1 or statement[i - 1] != " ":
        raise DataError(f"statement {statement!r} does not hold {answer!r} after a space; cannot cut a prompt")
    return statement[: i - 1]


def completion_records(facts: Iterable[Fact]) -> list[dict[str, str]]:
    """Per fact its second statement cut before the answer, {question: prefix, answer}: a completion
    (no QA template) of a statement the unlearning never saw; score with `evaluate(completion=...)`."""
    return [{"question": completion_prompt(f.paraphrases[0], f.answer), "answer": f.answer}
            for f in facts if f.paraphrases]


def write_records(facts: Iterable[Fact], path: str | os.PathLike) -> str:
    """Atomically write facts as jsonl records (question, answer, text, ...)."""
    text = "".join(json.dumps(f.to_record(), ensure_ascii=False) + "\n" for f in facts)
    return str(write_text(path, text))


def invent_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """n new capitalised names of 2-3 syllables, none in `taken` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        name = name.capitalize()
        if name in taken or len(name) > 11:
            continue
        taken.add(name)
        out.append(name)
    return out


def _make_fact(domain: str, entity: str, attr: Attribute, answer: str) -> Fact:
    statements = [s.format(e=entity, a=answer) for s in attr.statements]
    questions = [q.format(e=entity) for q in attr.questions]
    return Fact(id=f"{domain}/{entity}/{attr.name}", domain=domain, entity=entity, attribute=attr.name,
                question=questions[0], answer=answer, text=statements[0], paraphrases=tuple(statements[1:]),
                question_paraphrases=tuple(questions[1:]))


def _value_keys(facts: Sequence[Fact]) -> set[tuple[str, str]]:
    """(value pool, answer) of each fact: two facts about different entities are 'close' when they share one."""
    pools = {(d, a.name): a.pool for d, attrs in SCHEMA.items() for a in attrs}
    return {(pools[(f.domain, f.attribute)], f.answer) for f in facts}


def generate_facts(config: FactsConfig | None = None) -> FactSet:
    """The facts of `config`, split into forget / retain / neighbor / holdout (see the module docstring)."""
    config = config or FactsConfig()
    config.validate()
    rng = random.Random(config.seed)
    taken: set[str] = set()
    trained_names = {d: invent_names(rng, config.entities_per_domain, taken) for d in config.domains}
    holdout_names = invent_names(rng, config.holdout_entities, taken)

    def answer_for(attr: Attribute) -> str:
        if attr.pool.startswith("@"):
            return rng.choice(trained_names[attr.pool[1:]])  # only trained entities appear as values
        return rng.choice(POOLS[attr.pool])

    by_entity: dict[tuple[str, str], list[Fact]] = {}
    for d in config.domains:
        for e in trained_names[d]:
            by_entity[(d, e)] = [_make_fact(d, e, a, answer_for(a)) for a in SCHEMA[d]]
    holdout = [_make_fact(config.forget_domain, e, a, answer_for(a))
               for e in holdout_names for a in SCHEMA[config.forget_domain]]

    fd = config.forget_domain
    if config.forget_entities is None:
        forget_keys = [(fd, e) for e in trained_names[fd]]
    else:
        forget_keys = [(fd, e) for e in rng.sample(trained_names[fd], config.forget_entities)]
    forget_set = set(forget_keys)
    forget = [f for k in forget_keys for f in by_entity[k]]

    forget_values = _value_keys(forget)
    if config.forget_entities is None:
        candidates = [k for k in by_entity if k[0] != fd]
    else:
        candidates = [k for k in by_entity if k[0] == fd and k not in forget_set]
    # closest first: most attribute values shared with the forget facts; ties broken by a seeded shuffle
    rng.shuffle(candidates)
    candidates.sort(key=lambda k: -len(_value_keys(by_entity[k]) & forget_values))
    neighbor_keys = candidates[: config.neighbor_entities]
    neighbor_set = set(neighbor_keys)
    neighbor = [f for k in neighbor_keys for f in by_entity[k]]
    rest = [k for k in by_entity if k not in forget_set and k not in neighbor_set]
    utility_keys: set[tuple[str, str]] = set()
    for d in config.domains:  # per domain, so that both retain_train and utility cover every domain
        keys = [k for k in rest if k[0] == d]
        rng.shuffle(keys)
        n = round(len(keys) * config.utility_fraction)
        if len(keys) >= 2:
            n = min(max(n, 1), len(keys) - 1)
        utility_keys.update(keys[:n])
    retain_train = [f for k in rest if k not in utility_keys for f in by_entity[k]]
    utility = [f for k in rest if k in utility_keys for f in by_entity[k]]
    if not retain_train or not utility:
        raise BadInputError("this configuration leaves no retain_train or no utility facts; raise "
                            "entities_per_domain or lower neighbor_entities")
    return FactSet(config=config, splits={"forget": forget, "retain_train": retain_train, "utility": utility,
                                          "neighbor": neighbor, "holdout": holdout})


__all__ = ["DOMAINS", "POOLS", "QA_TEMPLATE", "SCHEMA", "SPLITS", "TRAINED_SPLITS", "Attribute", "Fact", "FactSet", "FactsConfig",
           "generate_facts", "invent_names", "qa_records", "unlearning_records", "write_records"]
