"""Stage 3, batches: the forget and retain data as padded batches, and the items of each epoch.

Texts are tokenized once, in a seeded order (the seed changes which texts share a batch); each
training item is one forget batch paired with one retain batch (`ForgetRetainPairs`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.validate import check_token_ids

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batches:
    """The run's data: forget batches, and retain batches (None without retain data)."""

    forget: list[Batch]
    retain: list[Batch] | None


def make_batches(cfg: UnlearnConfig, forget: Any, retain: Any, tokenizer: Any, model: nn.Module) -> Batches:
    """Both data sets tokenized as the config says; token ids past the model's embedding are refused."""
    kw = dict(batch_size=cfg.batch_size, max_length=cfg.max_length, field_name=cfg.field,
              loss_tokens=cfg.loss_tokens, model=model, template=cfg.template)
    return Batches(forget=tokenize(forget, tokenizer, what="forget", seed=cfg.seed, **kw),
                   retain=tokenize(retain, tokenizer, what="retain", seed=cfg.seed + 1, **kw)
                   if retain is not None else None)


def tokenize(source: Any, tokenizer: Any, *, batch_size: int, max_length: int, field_name: str | None,
             what: str, loss_tokens: str, seed: int, model: nn.Module | None = None,
             template: str | None = None) -> list[Batch]:
    """The padded batches of one data set, its texts in a seeded order (so the seed changes
    which texts share a batch). QA records score their answer tokens only unless
    loss_tokens="all" (see moe_unlearn.data.tokenize_batches). With `model`, token ids past its
    embedding are refused."""
    from moe_unlearn.data import TokenizedBatches, load_examples, tokenize_batches

    if isinstance(source, TokenizedBatches):
        tb = source
    else:
        if tokenizer is None:
            raise BadInputError("unlearn() needs tokenizer=... to tokenize text data")
        try:
            examples = load_examples(source, field=field_name, template=template, tokenizer=tokenizer)
        except DataError as exc:
            raise DataError(f"{what} set: {exc}") from exc
        tb = tokenize_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length,
                              padding_side="right", loss_tokens=loss_tokens)
    if tb.num_tokens == 0:
        raise DataError(f"the {what} set has no tokens after tokenization")
    if tb.num_label_tokens == 0:
        raise DataError(f"the {what} set has no scored token positions (every text is a prompt without an "
                        "answer, or a single token); a loss on it would change nothing")
    if tb.padding_side != "right":
        raise BadInputError("unlearn() needs right-padded batches (padding_side='right')")
    if model is not None:
        check_token_ids(model, tb.sequences, what=f"{what} set")
    return list(tb.shuffled(seed))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


class ForgetRetainPairs:
    """The training items of one epoch: every forget batch once, in a seeded order, each paired
    with a retain batch.

    Retain batches are drawn on their own counter across epochs: item g (counted over all
    epochs) takes position g mod n_retain of the seeded permutation number g // n_retain, so a
    retain set larger than the forget set is used in full and every retain batch is used equally
    often. The orders depend on (seed, epoch) only, so the same seed reproduces a run exactly
    (and a resumed run sees the same pairs), and another seed gives other orders and pairs."""

    def __init__(self, n_forget: int, n_retain: int, seed: int = 0) -> None:
        self.n_forget, self.n_retain, self.seed = n_forget, n_retain, seed

    def __len__(self) -> int:
        return self.n_forget

    def _perm(self, kind: int, index: int, n: int) -> list[int]:
        order = list(range(n))
        random.Random(f"{self.seed}/{kind}/{index}").shuffle(order)  # str seeds hash with sha512: stable
        return order

    def __call__(self, epoch: int) -> list[dict[str, int | None]]:
        out: list[dict[str, int | None]] = []
        for j, k in enumerate(self._perm(0, epoch, self.n_forget)):
            rk = None
            if self.n_retain:
                g = epoch * self.n_forget + j
                rk = self._perm(1, g // self.n_retain, self.n_retain)[g % self.n_retain]
            out.append({"k": k, "rk": rk})
        return out


__all__ = ["Batch", "Batches", "ForgetRetainPairs", "make_batches", "to_device", "tokenize"]
