"""Membership-inference scores per text, AUC between forget and holdout, and PrivLeak (MUSE).

Sign convention: every score is "higher = looks LESS like training data" (like a loss), so
    AUC = P(score(holdout text) > score(forget text)) + 0.5 * P(tie)
with forget labelled 0 and holdout labelled 1. AUC near 1: forget texts are still clearly
recognisable as members; 0.5: indistinguishable from never-seen text (what a model retrained
without the forget set gives); below 0.5: the forget texts look *less* familiar than unseen
text (over-unlearning, itself a membership signal).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from moe_unlearn.errors import BadInputError

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")
MIN_K_RATIO = 0.4


def loss_score(logp: torch.Tensor) -> float:
    """LOSS attack: mean NLL of the text's tokens."""
    return float(-logp.float().mean())


def zlib_score(logp: torch.Tensor, text: str) -> float:
    """ZLib attack: mean NLL / length in bytes of the zlib-compressed UTF-8 text."""
    return loss_score(logp) / len(zlib.compress(text.encode("utf-8")))


def _lowest_k_mean(values: torch.Tensor, ratio: float) -> float:
    if not 0 < ratio <= 1:
        raise BadInputError(f"Min-K% ratio must be in (0, 1], got {ratio}")
    k = max(1, int(len(values) * ratio))  # at least one token, as in the Min-K% code (floor of n * k)
    return float(torch.sort(values.float()).values[:k].mean())


def min_k_score(logp: torch.Tensor, ratio: float = MIN_K_RATIO) -> float:
    """Min-K%: minus the mean of the lowest max(1, floor(k * n)) token log-probs."""
    return -_lowest_k_mean(logp, ratio)


def min_k_pp_score(logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, ratio: float = MIN_K_RATIO) -> float:
    """Min-K%++: Min-K% on (log p - mu) / sigma, mu and sigma^2 the mean and variance of log p
    under the model's next-token distribution at that position."""
    return -_lowest_k_mean((logp.float() - mu.float()) / sigma.float(), ratio)


def auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """Mann-Whitney AUC with ties counted 1/2: P(holdout score > forget score). See module docstring."""
    f = np.asarray(forget_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    if f.size == 0 or h.size == 0:
        raise BadInputError("AUC needs at least one forget and one holdout score")
    if not (np.isfinite(f).all() and np.isfinite(h).all()):
        raise BadInputError("AUC got non-finite scores (NaN/inf); check the model's outputs")
    ranks = rankdata(np.concatenate([f, h]))  # average ranks for ties
    u_holdout = ranks[f.size:].sum() - h.size * (h.size + 1) / 2
    return float(u_holdout / (f.size * h.size))


def privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """MUSE PrivLeak in percent: (AUC_unlearned - AUC_retrained) / AUC_retrained * 100.
    0 is ideal; large positive = forget set still leaks (under-unlearning); large negative = over-unlearning."""
    if not auc_retrained > 0:
        raise BadInputError(f"reference AUC must be > 0, got {auc_retrained}")
    return (auc_unlearned - auc_retrained) / auc_retrained * 100.0


def text_scores(logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, text: str,
                ratio: float = MIN_K_RATIO) -> dict[str, float]:
    """All four attack scores of one text from its per-token log-probs (positions 1..n-1)."""
    return {"loss": loss_score(logp), "zlib": zlib_score(logp, text), "min_k": min_k_score(logp, ratio),
            "min_k_pp": min_k_pp_score(logp, mu, sigma, ratio)}


@dataclass
class MIAResult:
    """AUC per attack (forget = 0, holdout = 1; see module docstring), mean scores per split,
    and PrivLeak per attack when a reference AUC was given."""

    auc: dict[str, float]
    mean_forget: dict[str, float]
    mean_holdout: dict[str, float]
    n_forget: int
    n_holdout: int
    min_k_ratio: float = MIN_K_RATIO
    privleak: dict[str, float] | None = None
    reference_auc: dict[str, float] | None = None


def mia_result(forget: Sequence[Mapping[str, float]], holdout: Sequence[Mapping[str, float]],
               reference_auc: float | Mapping[str, float] | None = None,
               ratio: float = MIN_K_RATIO) -> MIAResult:
    """AUCs from per-text score dicts (from `text_scores`). `reference_auc`: the same AUC measured on a
    retrained / reference model, one float (used for every attack) or one per attack name."""
    aucs = {a: auc([s[a] for s in forget], [s[a] for s in holdout]) for a in MIA_ATTACKS}
    means_f = {a: float(np.mean([s[a] for s in forget])) for a in MIA_ATTACKS}
    means_h = {a: float(np.mean([s[a] for s in holdout])) for a in MIA_ATTACKS}
    ref = leak = None
    if reference_auc is not None:
        if isinstance(reference_auc, Mapping):
            unknown = set(reference_auc) - set(MIA_ATTACKS)
            if unknown:
                raise BadInputError(f"reference_auc has unknown attacks {sorted(unknown)}; known: {MIA_ATTACKS}")
            ref = {a: float(v) for a, v in reference_auc.items()}
        else:
            ref = {a: float(reference_auc) for a in MIA_ATTACKS}
        leak = {a: privleak(aucs[a], r) for a, r in ref.items() if not math.isnan(r)}
    return MIAResult(aucs, means_f, means_h, len(forget), len(holdout), ratio, leak, ref)
