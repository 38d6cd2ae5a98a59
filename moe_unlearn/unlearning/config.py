"""`UnlearnConfig`: every knob of one unlearning run, in one serialisable dataclass.

`unlearn(model, forget, retain, tokenizer=tok, config=cfg)` takes it; keyword arguments of
`unlearn()` build one (`unlearn(..., lr=1e-5)` == `config=UnlearnConfig(lr=1e-5)`); the CLI
builds it from its flags and `--config run.yaml|json`; every patch.json stores it under
"config", so `moe-unlearn unlearn --config patch/patch.json --out new/` replays a run.
Adding an option to unlearning = adding a field here (with its default and a comment).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_unlearn.config_aliases import apply_aliases
from moe_unlearn.errors import BadInputError


@dataclass
class UnlearnConfig:
    """The knobs of `unlearn()`; see its docstring for what each does."""

    # what to unlearn, where
    method: str = "npo"  # a name in objectives.OBJECTIVES
    method_kwargs: dict[str, Any] = field(default_factory=dict)  # the method's hyperparameters
    scope: str = "uoe"  # full | experts | routers | uoe | topm
    target: Any = None  # "L:E", (L, E), a list of them, an Attribution; None = attribute the forget set
    top_m: int = 2
    topm_layer: int | None = None
    allow_shared: bool = False
    # optimisation (moe_unlearn.training)
    steps: int | None = 20
    epochs: int | None = None
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool | str = "auto"
    # extra loss terms
    anchor_weight: float = 1.0  # SEUF router anchor (uoe / topm)
    retain_routing_weight: float = 0.0
    # MoE-aware variants (moe_unlearn.unlearning.projection / trace); all need retain data
    router_projection: str | None = None  # "grip"
    expert_projection: str | None = None  # "retain_null" (uoe / topm)
    projection_energy: float = 0.99
    retain_weighting: str | None = None  # "trace"
    coverage: float | None = None  # topm: experts covering this share of the forget tokens
    # low-rank adapters (moe_unlearn.unlearning.adapters): train W0 + B A on the expert matrices
    adapter: str | None = None  # "lora" (scopes uoe / topm / experts), None = full slices
    adapter_rank: int = 8
    adapter_router: bool = False  # the router too (else it trains in full: E x H, already small)
    adapter_gram_rank: int = 256  # eigendirections kept of each input Gram matrix (for fuse_patches; 0 = none)
    # data
    field: str | None = None
    loss_tokens: str = "answer"
    template: str | None = None  # QA records: a text with {question} {answer}; "chat" = the tokenizer's chat template
    # memory / speed
    prefix_cache: bool = True
    prefix_cache_mb: float = 1024
    gradient_checkpointing: bool = False
    # outputs and checkpoints
    out_dir: str | None = None
    merge: bool = False
    model_dir: str | None = None
    resume: bool = False
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    progress: bool = True
    report_to: str | list[str] | None = None  # metrics sinks of the loop: "tensorboard", "jsonl" (moe_unlearn.log)
    logging_dir: str | None = None  # where report_to writes

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, base: UnlearnConfig | None = None, **overrides: Any) -> UnlearnConfig:
        """`base` (or the defaults) with `overrides`; an unknown name is a TypeError, like any
        unknown keyword argument."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unlearn() got unknown options {unknown}; valid: {', '.join(cls.names())}")
        cfg = dataclasses.replace(base) if base is not None else cls()
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.method_kwargs = dict(cfg.method_kwargs or {})
        for k in ("out_dir", "model_dir", "checkpoint_dir", "logging_dir"):
            v = getattr(cfg, k)
            if v is not None:
                setattr(cfg, k, os.fspath(v))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the target is written as the list of "L:E" strings it names (an attribution
        as the targets chosen from it, `resolved_targets`)."""
        d = {k: getattr(self, k) for k in self.names()}
        d["method_kwargs"] = dict(self.method_kwargs)
        d["target"] = _target_strings(self.target)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnlearnConfig:
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise BadInputError(f"unknown run options {unknown}; valid: {', '.join(cls.names())}")
        return cls.build(**d)


def _target_strings(target: Any) -> list[str] | None:
    if target is None:
        return None
    if isinstance(target, (str, tuple)) or hasattr(target, "layer"):
        target = [target]
    if hasattr(target, "top"):  # an Attribution object: not serialisable, the caller records resolved targets
        return None
    out = []
    for t in target:
        out.append(f"{t[0]}:{t[1]}" if isinstance(t, tuple) else str(t))
    return out


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """The run options of a .yaml/.yml/.json file: a flat mapping of UnlearnConfig fields (plus
    "model", "forget", "retain" for the CLI), or a patch.json (its "config" and "inputs")."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"--config {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / JSONDecodeError: a bad input either way
        raise BadInputError(f"--config {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: "
                            f"{' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"--config {p} must hold a mapping of option names to values")
    if "config" in data and isinstance(data["config"], dict):  # a patch.json: replay its run
        return {**data.get("inputs", {}), **data["config"]}
    return apply_aliases(data)  # TrainingArguments names (learning_rate, max_steps, ...): moe_unlearn.config_aliases
