"""Small input checks shared by every entry point, so a bad value fails up front with one message
instead of deep inside torch (a zero beta dividing by zero, a negative lr reaching AdamW, a token id
past the embedding table raising IndexError on the CPU and a device-side assert on CUDA)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from moe_unlearn.errors import BadInputError, DataError

__all__ = ["check_choice", "check_int", "check_number", "check_token_ids", "embedding_rows"]


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float: a real, finite number (bools refused) inside [low, high] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
                value = float(value)
            else:
                raise TypeError
        except (TypeError, ImportError):
            raise BadInputError(f"{name} must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise BadInputError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise BadInputError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int (bools and floats refused) inside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadInputError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise BadInputError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise BadInputError(f"{name} must be <= {high}, got {value}")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`, else BadInputError listing them."""
    choices = list(choices)
    if value not in choices:
        raise BadInputError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def embedding_rows(model: Any) -> int | None:
    """Rows of the model's input embedding table (the number of valid token ids), or None if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
        return int(weight.shape[0])
    return None


def check_token_ids(model: Any, sequences: Iterable[Any], *, what: str = "data") -> None:
    """DataError if any id in `sequences` (1-D tensors or lists of ints) is negative or not a row of the model's
    embedding table: the tokenizer does not belong to the model."""
    rows = embedding_rows(model)
    if rows is None:
        return
    import torch

    hi, lo = -1, 0
    for seq in sequences:
        t = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq, dtype=torch.long)
        if t.numel():
            hi, lo = max(hi, int(t.max())), min(lo, int(t.min()))
    if hi >= rows or lo < 0:
        bad = hi if hi >= rows else lo
        raise DataError(f"the {what} tokenizes to token id {bad}, but the model's embedding has {rows} rows "
                        "(valid ids 0..{}); the tokenizer does not belong to this model".format(rows - 1))
