"""Hugging Face TrainingArguments names accepted in run files (`--config run.yaml`), so a recipe
written for a Trainer reads here: `learning_rate: 1e-5` means `lr: 1e-5`.

`apply_aliases(options)` renames them to UnlearnConfig fields (the run-file reader calls it); a
file that gives both an alias and its field with different values is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_unlearn.errors import BadInputError

# TrainingArguments name -> UnlearnConfig field
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "lr_schedule",
    "output_dir": "out_dir",
}
# TrainingArguments schedule names -> ours (the warm-up is warmup_steps in both)
_SCHEDULES = {"constant_with_warmup": "constant", "cosine_with_restarts": None, "polynomial": None}


def _value(alias: str, value: Any) -> Any:
    if alias == "num_train_epochs" and isinstance(value, float):
        if not value.is_integer():
            raise BadInputError(f"num_train_epochs {value}: only whole epochs are supported")
        return int(value)
    if alias == "lr_scheduler_type" and isinstance(value, str) and value in _SCHEDULES:  # others: the typed check
        if _SCHEDULES[value] is None:
            raise BadInputError(f"lr_scheduler_type {value!r} is not supported; use constant, linear or cosine")
        return _SCHEDULES[value]
    return value


def apply_aliases(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with TrainingArguments names renamed to UnlearnConfig fields (see ALIASES).
    num_train_epochs without max_steps/steps also clears the default step count."""
    out = {k: v for k, v in options.items() if k not in ALIASES}
    for alias, name in ALIASES.items():
        if alias not in options:
            continue
        value = _value(alias, options[alias])
        if name in options and options[name] != value:
            raise BadInputError(f"run options give both {alias}={options[alias]!r} and {name}={options[name]!r}; "
                                f"keep one ({alias} is the TrainingArguments name of {name})")
        out[name] = value
    if "num_train_epochs" in options and "steps" not in out:
        out["steps"] = None
    return out


__all__ = ["ALIASES", "apply_aliases"]
