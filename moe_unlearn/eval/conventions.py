"""Named evaluation conventions: the choices on which MUSE and open-unlearning (TOFU) differ.

Each choice is a field of `Convention`; `CONVENTIONS` holds the two published presets, and every
evaluation function takes `convention="muse" | "open-unlearning"` or a `Convention` (a preset
with fields replaced: `dataclasses.replace(get_convention("muse"), rouge_stemmer=True)`).

What the two benchmarks' public code does (read 2026-12):

| choice | MUSE | open-unlearning |
|---|---|---|
| `mia_tokens`: tokens a QA record's MIA score uses | `"all"`: the whole text, every token after the first | `"answer"`: the answer tokens only |
| `min_k_rounding`: how many tokens Min-K% keeps of n | `"int"`: int(n * k) (the Min-K% paper's code; 0 tokens gives NaN) | `"floor_min1"`: max(1, int(n * k)) |
| `verbmem_new_tokens`: VerbMem generation length | `"fixed"`: always `verbmem_max_new_tokens` (128) new tokens, stop at EOS, against the first 128 tokens of the true continuation | same |
| `rouge_stemmer`: Porter stemming in ROUGE-L | off | on |
| `knowmem_few_shot`: KnowMem prompt | few-shot: `Question: q\\nAnswer: a\\n\\n` per example, then the question | same form |
| `knowmem_stops`: where a KnowMem answer is cut | `"\\n\\n"`, `"\\nQuestion"`, `"Question:"` | same |

open-unlearning also drops the last labelled token of every answer; in its data that token is the
EOS appended to each answer, and our items carry no EOS, so the scored answer tokens are the same.
`"truth"` for `verbmem_new_tokens` (generate as many tokens as the true continuation has) is this
toolkit's older behaviour, kept as a named choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_unlearn.errors import BadInputError

MUSE_KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


@dataclass(frozen=True)
class Convention:
    """One benchmark's evaluation choices (see the module docstring for what each means)."""

    name: str
    mia_tokens: Literal["all", "answer"]
    min_k_rounding: Literal["int", "floor_min1"]
    verbmem_new_tokens: Literal["fixed", "truth"]
    rouge_stemmer: bool
    knowmem_few_shot: bool = True
    knowmem_stops: tuple[str, ...] = MUSE_KNOWMEM_STOPS

    def __post_init__(self) -> None:
        for field, value, allowed in (("mia_tokens", self.mia_tokens, ("all", "answer")),
                                      ("min_k_rounding", self.min_k_rounding, ("int", "floor_min1")),
                                      ("verbmem_new_tokens", self.verbmem_new_tokens, ("fixed", "truth"))):
            if value not in allowed:
                raise BadInputError(f"convention field {field}={value!r}; choose one of {allowed}")


CONVENTIONS: dict[str, Convention] = {
    "muse": Convention("muse", mia_tokens="all", min_k_rounding="int", verbmem_new_tokens="fixed",
                       rouge_stemmer=False),
    "open-unlearning": Convention("open-unlearning", mia_tokens="answer", min_k_rounding="floor_min1",
                                  verbmem_new_tokens="fixed", rouge_stemmer=True),
}


def get_convention(convention: str | Convention) -> Convention:
    """A preset by name ("muse", "open-unlearning") or a Convention as given."""
    if isinstance(convention, Convention):
        return convention
    if convention not in CONVENTIONS:
        raise BadInputError(f"unknown convention {convention!r}; choose one of {sorted(CONVENTIONS)} "
                            "or pass a moe_unlearn.eval.Convention")
    return CONVENTIONS[convention]
