"""Multiple-choice accuracy (WMDP / MMLU style) by option log-likelihood.

Each option is scored as the continuation `answer_prefix + choice` of the prompt
`template.format(question=...)`: the sum of its token log-probs. `accuracy` picks the option
with the highest sum (no length normalisation, as lm-eval's `acc`); `accuracy_norm` picks the
highest mean log-prob per option token (length-normalised). Chance is the mean of 1 / #choices
(0.25 for four options).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from moe_unlearn.eval.items import EvalItem, ItemsLike, as_mcq_items
from moe_unlearn.eval.scoring import PromptFormat, encode_items, score_encoded

MCQ_TEMPLATE = "{question}\nAnswer:"


@dataclass
class McqResult:
    n: int
    accuracy: float
    accuracy_norm: float
    chance: float
    template: str = MCQ_TEMPLATE


def choose(option_logps: Sequence[Sequence[float]]) -> int:
    """Index of the best option (first one on ties)."""
    return int(np.argmax(np.asarray(option_logps, dtype=np.float64)))


def mcq_accuracy(model: nn.Module, tokenizer, data: ItemsLike, *, template: str = MCQ_TEMPLATE,
                 answer_prefix: str = " ", batch_size: int = 16, progress: bool = False,
                 max_length: int = 512) -> McqResult:
    """Accuracy over a jsonl path or list of {question, choices, answer (index or letter)} records."""
    mcq = as_mcq_items(data)
    flat = [EvalItem(question=m.question, answer=c) for m in mcq for c in m.choices]
    fmt = PromptFormat(template=template, answer_prefix=answer_prefix, max_length=max_length)
    scores = score_encoded(model, tokenizer, encode_items(tokenizer, flat, fmt), batch_size=batch_size,
                           progress=progress, desc="mcq").items
    hits, hits_norm, pos = [], [], 0
    for m in mcq:
        opts = scores[pos:pos + len(m.choices)]
        pos += len(m.choices)
        hits.append(choose([float(s.target_logp.sum()) for s in opts]) == m.answer)
        hits_norm.append(choose([float(s.target_logp.mean()) for s in opts]) == m.answer)
    return McqResult(n=len(mcq), accuracy=float(np.mean(hits)), accuracy_norm=float(np.mean(hits_norm)),
                     chance=float(np.mean([1.0 / len(m.choices) for m in mcq])), template=template)
