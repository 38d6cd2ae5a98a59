"""Multiple-choice accuracy (WMDP / MMLU style) by option log-likelihood, two protocols.

- "letters" (lm-evaluation-harness's WMDP and MMLU tasks): the prompt lists the choices,
  `{question}\nA. {c0}\nB. {c1}\n...\nAnswer:`, and each option is the continuation " A", " B", ...;
  MMLU's tasks also put a `description` line ("The following are multiple choice questions (with
  answers) about {subject}.\n\n") before it.
- "cloze": the prompt is `template.format(question=...)` and each option is the continuation
  `answer_prefix + choice`, the choice's own text scored.
Each option's score is the sum of its token log-probs. `accuracy` picks the highest sum (lm-eval's
`acc`); `accuracy_norm` the highest sum divided by the option's length in characters, without the
leading separator (lm-eval's `acc_norm`), `accuracy_bytes` by its length in UTF-8 bytes (lm-eval's
`acc_bytes`; the same for ASCII). Under "letters" every option is one character long, so both equal
`accuracy`. Ties go to the first option. Chance is the mean of 1 / #choices (0.25 for four).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.items import EvalItem, ItemsLike, McqItem, as_mcq_items
from moe_unlearn.eval.scoring import PromptFormat, encode_items, score_encoded

MCQ_TEMPLATE = "{question}\nAnswer:"
PROTOCOLS = ("letters", "cloze")


@dataclass
class McqResult:
    n: int
    accuracy: float
    accuracy_norm: float
    chance: float
    template: str = MCQ_TEMPLATE
    protocol: str = "cloze"
    accuracy_bytes: float | None = None


def choose(option_logps: Sequence[float]) -> int:
    """Index of the best option (first one on ties)."""
    return int(np.argmax(np.asarray(option_logps, dtype=np.float64)))


def letters_prompt(item: McqItem, description: str = "") -> str:
    """lm-eval's WMDP/MMLU prompt: the question, then one "X. choice" line per option, then "Answer:"."""
    if len(item.choices) > len(string.ascii_uppercase):
        raise BadInputError(f"letters protocol: {len(item.choices)} choices, at most 26 letters")
    lines = [item.question.strip()] + [f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(item.choices)]
    return description + "\n".join(lines) + "\nAnswer:"


def mcq_accuracy(model: nn.Module, tokenizer, data: ItemsLike, *, template: str = MCQ_TEMPLATE,
                 answer_prefix: str = " ", batch_size: int = 16, progress: bool = False,
                 max_length: int = 512, protocol: str = "cloze", description: str = "") -> McqResult:
    """Accuracy over a jsonl path or list of {question, choices, answer (index or letter)} records,
    under `protocol` "cloze" (template + each choice) or "letters" (lm-eval's A-D prompt; `template`
    is then unused, `description` is put before every prompt)."""
    if protocol not in PROTOCOLS:
        raise BadInputError(f"unknown mcq protocol {protocol!r}; choose one of {PROTOCOLS}")
    mcq = as_mcq_items(data)
    if protocol == "letters":
        flat = [EvalItem(question=letters_prompt(m, description), answer=string.ascii_uppercase[i])
                for m in mcq for i in range(len(m.choices))]
        fmt = PromptFormat(template="{question}", answer_prefix=answer_prefix, max_length=max_length)
        options = [[string.ascii_uppercase[i] for i in range(len(m.choices))] for m in mcq]
        template = description + "{question}\nA. {choice 0}\n...\nAnswer:"
    else:
        flat = [EvalItem(question=m.question, answer=c) for m in mcq for c in m.choices]
        fmt = PromptFormat(template=template, answer_prefix=answer_prefix, max_length=max_length)
        options = [list(m.choices) for m in mcq]
    scores = score_encoded(model, tokenizer, encode_items(tokenizer, flat, fmt), batch_size=batch_size,
                           progress=progress, desc="mcq").items
    hits, hits_norm, hits_bytes, pos = [], [], [], 0
    for m, opts in zip(mcq, options, strict=True):
        sums = np.array([float(s.target_logp.sum()) for s in scores[pos:pos + len(opts)]])
        pos += len(opts)
        hits.append(choose(sums) == m.answer)
        hits_norm.append(choose(sums / np.array([max(1, len(o)) for o in opts])) == m.answer)
        hits_bytes.append(choose(sums / np.array([max(1, len(o.encode("utf-8"))) for o in opts])) == m.answer)
    return McqResult(n=len(mcq), accuracy=float(np.mean(hits)), accuracy_norm=float(np.mean(hits_norm)),
                     chance=float(np.mean([1.0 / len(m.choices) for m in mcq])), template=template,
                     protocol=protocol, accuracy_bytes=float(np.mean(hits_bytes)))
