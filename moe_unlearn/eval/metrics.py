"""Quality of a split: NLL, answer-token accuracy, exact match, QA ROUGE-L (KnowMem) and VerbMem.

- nll: mean over items of the item's mean token NLL on its target tokens (QA: answer tokens;
  text: every token after the first), in nats.
- token_accuracy: mean over items of the fraction of target tokens that are the argmax.
- exact_match (QA items only): 1 when every answer token is the argmax given the question and the
  true preceding answer tokens, i.e. greedy decoding reproduces the answer's tokens exactly.
- rouge_l (QA items, MUSE's KnowMem): greedy answer (<= max_new_tokens, cut at EOS and at the
  first stop string) vs the true answer, ROUGE-L F1 x 100 (rouge-score), mean over items;
  rouge_l_recall the same with recall (TOFU's ROUGE).
- verbmem (every item with a text: plain texts, MUSE {prompt, gt} records, QA items that carry a
  statement): prefix -> greedy continuation vs the true continuation, ROUGE-L F1 x 100.
Stemming and the VerbMem length follow the evaluation convention (`moe_unlearn.eval.conventions`):
MUSE scores without stemming, open-unlearning with the Porter stemmer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from moe_unlearn.eval.scoring import ItemScores


@lru_cache(maxsize=2)
def _scorer(stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer)


def rouge_l(prediction: str, reference: str, *, stemmer: bool = True) -> float:
    """ROUGE-L F1 x 100 of one prediction against one reference (rouge-score library)."""
    return float(_scorer(stemmer).score(reference, prediction)["rougeL"].fmeasure * 100.0)


def rouge_l_recall(prediction: str, reference: str, *, stemmer: bool = True) -> float:
    """ROUGE-L recall x 100 (how much of the reference the prediction reproduces)."""
    return float(_scorer(stemmer).score(reference, prediction)["rougeL"].recall * 100.0)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text up to the first occurrence of any stop string (generation stops at a new line, say)."""
    cut = len(text)
    for s in stop_strings:
        if s:
            pos = text.find(s)
            if 0 <= pos < cut:
                cut = pos
    return text[:cut]


def item_nll(s: ItemScores) -> float:
    return float(-s.target_logp.float().mean())


def item_accuracy(s: ItemScores) -> float:
    return float(s.target_correct.float().mean())


def item_exact_match(s: ItemScores) -> float:
    return float(bool(s.target_correct.all()))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass
class SplitMetrics:
    """Quality metrics of one split (see module docstring). None = not applicable (no QA / no text
    items, or generation switched off)."""

    n_items: int
    n_qa: int
    n_text: int  # text-only items (QA items that also carry a text count as QA)
    nll: float
    token_accuracy: float
    exact_match: float | None = None
    rouge_l: float | None = None
    rouge_l_recall: float | None = None
    verbmem: float | None = None


def split_metrics(scores: Sequence[ItemScores], is_qa: Sequence[bool], *, qa_rouge: Sequence[float] = (),
                  qa_rouge_recall: Sequence[float] = (), verbmem: Sequence[float] = ()) -> SplitMetrics:
    """Aggregate per-item scores (and per-item ROUGE values, when generation ran) into SplitMetrics."""
    qa = [s for s, q in zip(scores, is_qa, strict=True) if q]
    return SplitMetrics(
        n_items=len(scores), n_qa=len(qa), n_text=len(scores) - len(qa),
        nll=float(np.mean([item_nll(s) for s in scores])),
        token_accuracy=float(np.mean([item_accuracy(s) for s in scores])),
        exact_match=_mean([item_exact_match(s) for s in qa]),
        rouge_l=_mean(list(qa_rouge)), rouge_l_recall=_mean(list(qa_rouge_recall)), verbmem=_mean(list(verbmem)),
    )
