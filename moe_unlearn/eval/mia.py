"""Membership-inference scores per text, AUC between forget and holdout, and PrivLeak (MUSE).

Sign convention: every score is "higher = looks LESS like training data" (like a loss), so
    AUC = P(score(holdout text) > score(forget text)) + 0.5 * P(tie)
with forget labelled 0 and holdout labelled 1 (open-unlearning's orientation). AUC near 1: forget
texts are still clearly recognisable as members; 0.5: indistinguishable from never-seen text (what
a model retrained without the forget set gives); below 0.5: the forget texts look *less* familiar
than unseen text (over-unlearning, itself a membership signal).

MUSE's code computes its AUC with `roc_curve(y, -score)` (forget 0, holdout 1), which is 1 - AUC in
our orientation; `MIAResult.auc_muse` reports that number. PrivLeak follows MUSE exactly:
    PrivLeak = (AUC_muse(unlearned) - AUC_muse(retrained)) / AUC_muse(retrained) * 100,
which in our orientation is (AUC_r - AUC_u) / (1 - AUC_r) * 100; open-unlearning's `privleak`
converts to 1 - AUC first and gives the same number. 0 = like the retrained model; about -100 =
the forget set leaks as much as from the original model (under-unlearning); positive = forget
texts look less familiar than never-seen ones (over-unlearning). MUSE's published retrained-model
AUCs (Min-40%, MUSE orientation) are in `MUSE_RETRAIN_AUC`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from moe_unlearn.errors import BadInputError, DataError

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")
MIN_K_RATIO = 0.4
MIN_K_ROUNDINGS = ("int", "floor_min1")
# MUSE's retrained models, forget vs holdout, Min-40% (attack "min_k"), in MUSE's orientation
MUSE_RETRAIN_AUC = {"news": 0.4772, "books": 0.5393}


def loss_score(logp: torch.Tensor) -> float:
    """LOSS attack: mean NLL of the text's tokens."""
    return float(-logp.float().mean())


def zlib_score(logp: torch.Tensor, text: str) -> float:
    """ZLib attack: mean NLL / length in bytes of the zlib-compressed UTF-8 text."""
    return loss_score(logp) / len(zlib.compress(text.encode("utf-8")))


def min_k_count(n: int, ratio: float, rounding: str = "floor_min1") -> int:
    """How many of n tokens Min-K% keeps: "int" = int(n * k) (MUSE and the Min-K% paper's code;
    a text too short for one token is an error here, NaN there), "floor_min1" = max(1, int(n * k))
    (open-unlearning)."""
    if not 0 < ratio <= 1:
        raise BadInputError(f"Min-K% ratio must be in (0, 1], got {ratio}")
    if rounding not in MIN_K_ROUNDINGS:
        raise BadInputError(f"Min-K% rounding {rounding!r}; choose one of {MIN_K_ROUNDINGS}")
    k = int(n * ratio)
    if rounding == "floor_min1":
        return max(1, k)
    if k == 0:
        raise DataError(f"Min-K% with int(n * k) rounding keeps no token of a text with {n} scored tokens "
                        f"(k = {ratio}); use longer texts or min_k_rounding='floor_min1'")
    return k


def _lowest_k_mean(values: torch.Tensor, ratio: float, rounding: str) -> float:
    k = min_k_count(len(values), ratio, rounding)
    return float(torch.sort(values.float()).values[:k].mean())


def min_k_score(logp: torch.Tensor, ratio: float = MIN_K_RATIO, rounding: str = "floor_min1") -> float:
    """Min-K%: minus the mean of the lowest `min_k_count(n, ratio, rounding)` token log-probs."""
    return -_lowest_k_mean(logp, ratio, rounding)


def min_k_pp_score(logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, ratio: float = MIN_K_RATIO,
                   rounding: str = "floor_min1") -> float:
    """Min-K%++: Min-K% on (log p - mu) / sigma, mu and sigma^2 the mean and variance of log p
    under the model's next-token distribution at that position."""
    return -_lowest_k_mean((logp.float() - mu.float()) / sigma.float(), ratio, rounding)


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


def muse_auc(our_auc: float) -> float:
    """The same AUC in MUSE's orientation (roc_curve(y, -score), forget 0, holdout 1): 1 - ours."""
    return 1.0 - our_auc


def privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """MUSE PrivLeak in percent from two AUCs in OUR orientation (see the module docstring):
    (AUC_r - AUC_u) / (1 - AUC_r) * 100 = MUSE's (AUC'_u - AUC'_r) / AUC'_r * 100 with AUC' = 1 - AUC.
    0 = like the retrained model; -100 = leaks like a model that memorised the forget set."""
    if not 0 <= auc_retrained < 1:
        raise BadInputError(f"reference AUC (our orientation) must be in [0, 1), got {auc_retrained}; "
                            "MUSE's orientation is 1 - ours (see moe_unlearn.eval.mia)")
    return (auc_retrained - auc_unlearned) / (1.0 - auc_retrained) * 100.0


def reference_aucs(reference: float | str | Mapping[str, float]) -> dict[str, float]:
    """{attack: reference AUC in our orientation} from a float (every attack), a mapping, or
    "muse-news" / "muse-books": MUSE's published retrained-model Min-40% AUC, converted."""
    if isinstance(reference, str):
        corpus = reference.removeprefix("muse-")
        if not reference.startswith("muse-") or corpus not in MUSE_RETRAIN_AUC:
            raise BadInputError(f"reference_auc {reference!r}: give a number, {{attack: number}}, or one of "
                                f"{['muse-' + c for c in MUSE_RETRAIN_AUC]}")
        return {"min_k": 1.0 - MUSE_RETRAIN_AUC[corpus]}
    if isinstance(reference, Mapping):
        unknown = set(reference) - set(MIA_ATTACKS)
        if unknown:
            raise BadInputError(f"reference_auc has unknown attacks {sorted(unknown)}; known: {MIA_ATTACKS}")
        return {a: float(v) for a, v in reference.items()}
    return {a: float(reference) for a in MIA_ATTACKS}


def text_scores(logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, text: str,
                ratio: float = MIN_K_RATIO, rounding: str = "floor_min1") -> dict[str, float]:
    """All four attack scores of one text from the per-token log-probs it is scored on."""
    return {"loss": loss_score(logp), "zlib": zlib_score(logp, text), "min_k": min_k_score(logp, ratio, rounding),
            "min_k_pp": min_k_pp_score(logp, mu, sigma, ratio, rounding)}


@dataclass
class MIAResult:
    """AUC per attack (our orientation, forget = 0, holdout = 1; see module docstring), the same in
    MUSE's orientation (`auc_muse` = 1 - auc), mean scores per split, and PrivLeak (MUSE's formula)
    per attack when a reference AUC (our orientation) was given."""

    auc: dict[str, float]
    mean_forget: dict[str, float]
    mean_holdout: dict[str, float]
    n_forget: int
    n_holdout: int
    min_k_ratio: float = MIN_K_RATIO
    privleak: dict[str, float] | None = None
    reference_auc: dict[str, float] | None = None
    auc_muse: dict[str, float] | None = None
    min_k_rounding: str = "floor_min1"
    tokens: str = "all"  # which tokens of a QA item were scored: "all" or "answer"


def mia_result(forget: Sequence[Mapping[str, float]], holdout: Sequence[Mapping[str, float]],
               reference_auc: float | str | Mapping[str, float] | None = None,
               ratio: float = MIN_K_RATIO, rounding: str = "floor_min1", tokens: str = "all") -> MIAResult:
    """AUCs from per-text score dicts (from `text_scores`). `reference_auc`: the same AUC measured on a
    retrained / reference model (our orientation), one float (every attack), one per attack name, or
    "muse-news" / "muse-books" (MUSE's published retrained AUC; see `reference_aucs`)."""
    aucs = {a: auc([s[a] for s in forget], [s[a] for s in holdout]) for a in MIA_ATTACKS}
    means_f = {a: float(np.mean([s[a] for s in forget])) for a in MIA_ATTACKS}
    means_h = {a: float(np.mean([s[a] for s in holdout])) for a in MIA_ATTACKS}
    ref = leak = None
    if reference_auc is not None:
        ref = reference_aucs(reference_auc)
        leak = {a: privleak(aucs[a], r) for a, r in ref.items() if not math.isnan(r)}
    return MIAResult(aucs, means_f, means_h, len(forget), len(holdout), ratio, leak, ref,
                     auc_muse={a: muse_auc(v) for a, v in aucs.items()}, min_k_rounding=rounding, tokens=tokens)
