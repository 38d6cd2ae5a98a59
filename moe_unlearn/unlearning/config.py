"""`UnlearnConfig`: every knob of one unlearning run, in one serialisable dataclass.

`unlearn(model, forget, retain, tokenizer=tok, config=cfg)` takes it; keyword arguments of
`unlearn()` build one (`unlearn(..., lr=1e-5)` == `config=UnlearnConfig(lr=1e-5)`); the CLI
builds it from its flags and `--config run.yaml|json`; every patch.json stores it under
"config", so `moe-unlearn unlearn --config patch/patch.json --out new/` replays a run.

Each field carries an `Option` in its metadata: its type, range or registry of choices, help
text, whether it has a CLI flag, and whether it enters the run identity (a checkpoint of a run
that differs in it is never resumed) and the patch's hyperparameter record. The CLI flags, the
type and range checks, the `--config` reader, the identity and the record are derived from it,
so adding an option = adding a field here + the code that uses it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_unlearn.config_aliases import apply_aliases
from moe_unlearn.errors import BadInputError
from moe_unlearn.validate import MAX_ITEMS, MAX_STEPS, MAX_TOKENS, check_int, check_number, check_type

_KINDS = ("bool", "int", "float", "str", "path", "dict", "any")


@dataclass(frozen=True)
class Option:
    """What the library derives from one `UnlearnConfig` field.

    kind: bool | int | float | str | path | dict | any (checked strictly: a string is never a bool, a
      float never an int). optional: None is a valid value. low / high / low_open: the range of a
      number. choices: a zero-argument callable returning the valid names (a `Registry` or a tuple),
      called lazily so this module imports no registry. cli: a `--flag` is derived (bools: store_true).
    identity: enters the run identity. record: enters patch.json's "hyperparameters"; `record_if`
      names a field that must be set for the value to be recorded (else None is recorded).
    """

    help: str
    kind: str
    optional: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: Callable[[], Iterable[str]] | None = None
    cli: bool = True
    identity: bool = False
    record: bool = False
    record_if: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Option kind must be one of {_KINDS}, got {self.kind!r}")

    def check(self, name: str, value: Any) -> None:
        """BadInputError naming `name` unless `value` has this option's type and lies in its range / choices."""
        if value is None:
            if not self.optional:
                raise BadInputError(f"{name} must be given (got None)")
            return
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise BadInputError(f"{name} must be true or false, got {value!r}")
        elif self.kind == "int":
            check_int(name, value, low=None if self.low is None else int(self.low),
                      high=None if self.high is None else int(self.high))
        elif self.kind == "float":
            check_number(name, value, low=self.low, high=self.high, low_open=self.low_open)
        elif self.kind == "str":
            check_type(name, value, str)  # a string, and text (no lone surrogate: patch.json could not be read)
        elif self.kind == "path" and not isinstance(value, (str, os.PathLike)):
            raise BadInputError(f"{name} must be a path, got {value!r}")
        elif self.kind == "dict" and not isinstance(value, Mapping):
            raise BadInputError(f"{name} must be a mapping of names to values, got {value!r}")
        if self.choices is not None:
            valid = self.choices()
            lookup = getattr(valid, "lookup", None)
            if lookup is not None:  # a Registry words its own error
                lookup(value)
            elif value not in tuple(valid):
                none = " or None" if self.optional else ""
                raise BadInputError(f"{name} must be one of {', '.join(map(str, valid))}{none}, got {value!r}")


def option(default: Any = None, *, factory: Callable[[], Any] | None = None, **meta: Any) -> Any:
    """A dataclass field of `UnlearnConfig` with its `Option`."""
    md = {"option": Option(**meta)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _methods():
    from moe_unlearn.unlearning.methods import METHODS

    return METHODS


def _scopes():
    from moe_unlearn.unlearning.scopes import SCOPES

    return SCOPES


def _routings():
    from moe_unlearn.unlearning.routing import ROUTINGS

    return ROUTINGS


def _adapters():
    from moe_unlearn.unlearning.adapters import ADAPTERS

    return ADAPTERS


def _router_projections():
    from moe_unlearn.unlearning.projection import ROUTER_PROJECTIONS

    return ROUTER_PROJECTIONS


def _expert_projections():
    from moe_unlearn.unlearning.projection import EXPERT_PROJECTIONS

    return EXPERT_PROJECTIONS


def _retain_weightings():
    from moe_unlearn.unlearning.trace import RETAIN_WEIGHTINGS

    return RETAIN_WEIGHTINGS


def _lr_schedules():
    from moe_unlearn.training import LR_SCHEDULES

    return LR_SCHEDULES


def _shard_modes():
    from moe_unlearn.sharding import SHARD_MODES

    return SHARD_MODES


def _loss_tokens():
    from moe_unlearn.data import LOSS_TOKENS

    return LOSS_TOKENS


_ID = dict(identity=True, record=True)  # most run knobs: part of what the run is and of what it records


@dataclass
class UnlearnConfig:
    """The knobs of `unlearn()`; each field's help (`UnlearnConfig.options()[name].help`) says what it does."""

    # what to unlearn, where
    method: str = option("npo", kind="str", choices=_methods, identity=True,
                         help="unlearning method (default npo); ablate (uoe/topm): zero the targets' down "
                              "projections, no training")
    method_kwargs: dict[str, Any] = option(factory=dict, kind="dict", cli=False,
                                           help="the method's hyperparameters (CLI: --set NAME=VALUE)")
    scope: str = option("uoe", kind="str", choices=_scopes, identity=True, help="what trains (default uoe)")
    target: Any = option(None, kind="any", optional=True, cli=False,
                         help='"L:E", (L, E), a list of them, an Attribution; None = attribute the forget set')
    top_m: int = option(2, kind="int", low=1, high=MAX_ITEMS, help="experts for --scope topm from the attribution (2)")
    topm_layer: int | None = option(None, kind="int", optional=True, low=0, high=MAX_ITEMS,
                                    help="take the topm experts from this layer only")
    allow_shared: bool = option(False, kind="bool", help="allow a shared expert as target")
    routing: str = option("learned", kind="str", choices=_routings, **_ID,
                          help="learned (default): the scope's routers train; frozen: no router trains (no anchor); "
                               "forced: frozen, and the original top-K and gates are forced at every MoE layer")
    # optimisation (moe_unlearn.training)
    steps: int | None = option(20, kind="int", optional=True, low=1, high=MAX_STEPS, record=True,
                               help="optimizer steps (default 20)")
    epochs: int | None = option(None, kind="int", optional=True, low=1, high=MAX_STEPS, record=True,
                                help="passes over the forget set (instead of --steps)")
    lr: float = option(1e-4, kind="float", low=0.0, low_open=True, record=True, help="learning rate (1e-4)")
    batch_size: int = option(4, kind="int", low=1, high=MAX_ITEMS, **_ID, help="texts per batch (4)")
    grad_accum: int = option(1, kind="int", low=1, high=MAX_STEPS, record=True, help="micro-batches per step (1)")
    max_length: int = option(256, kind="int", low=2, high=MAX_TOKENS, **_ID,  # one position to predict needs two tokens
                             help="tokens kept of each text (256)")
    lr_schedule: str = option("constant", kind="str", choices=_lr_schedules, record=True,
                              help="constant (default), linear or cosine decay")
    warmup_steps: int = option(0, kind="int", low=0, high=MAX_STEPS, record=True, help="steps of linear warm-up (0)")
    weight_decay: float = option(0.0, kind="float", low=0.0, record=True, help="AdamW weight decay (0)")
    max_grad_norm: float | None = option(1.0, kind="float", optional=True, low=0.0, record=True,
                                         help="clip the gradient norm (1.0; 0 = no clipping)")
    seed: int = option(0, kind="int", low=0, record=True,
                       help="orders texts into batches, forget batches per epoch and the forget/retain pairing (0)")
    bf16: bool | str = option("auto", kind="any", cli=False, choices=lambda: (True, False, "auto"),
                              help="autocast to bf16: True, False or 'auto' (CUDA with bf16 support)")
    # extra loss terms
    anchor_weight: float = option(1.0, kind="float", low=0.0, **_ID, help="SEUF router anchor weight (uoe/topm; 1.0)")
    retain_routing_weight: float = option(0.0, kind="float", low=0.0, **_ID,
                                          help="KL(original || current) routing on retain tokens at trained "
                                               "routers (0)")
    sam_rho: float = option(0.0, kind="float", low=0.0, **_ID,
                            help="sharpness-aware unlearning: take the forget loss at the trained tensors moved by "
                                 "this radius along its normalised gradient (0 = off; one extra forward/backward)")
    distill_steps: int = option(0, kind="int", low=0, high=MAX_STEPS, **_ID,
                                help="UNDO: after unlearning, noise the trained tensors and distil the unlearned model "
                                     "into them for this many steps on the forget and retain batches (0 = off)")
    distill_noise: float = option(0.5, kind="float", low=0.0, high=1.0, low_open=True, **_ID,
                                  help="UNDO's alpha: theta <- (1 - alpha) theta + alpha * noise (1 = re-initialise; 0.5)")
    # MoE-aware variants (moe_unlearn.unlearning.projection / trace); all need retain data
    router_projection: str | None = option(None, kind="str", optional=True, choices=_router_projections, **_ID,
                                           help="grip: keep the trained routers' logits on retain inputs fixed "
                                                "(change projected off their span after every step)")
    expert_projection: str | None = option(None, kind="str", optional=True, choices=_expert_projections, **_ID,
                                           help="retain_null: project the trained experts' change off the span of "
                                                "the retain tokens routed to them (uoe / topm)")
    projection_energy: float = option(0.99, kind="float", low=0.0, high=1.0, low_open=True, **_ID,
                                      help="energy fraction of the retain span the projections keep (0.99)")
    retain_weighting: str | None = option(None, kind="str", optional=True, choices=_retain_weightings, **_ID,
                                          help="trace: weight retain tokens by how forget-critical their experts are")
    coverage: float | None = option(None, kind="float", optional=True, low=0.0, high=1.0, low_open=True,
                                    record=True,
                                    help="--scope topm: take the experts that together cover this share of the "
                                         "forget tokens (attributes the forget data, with --retain for selectivity)")
    # low-rank adapters (moe_unlearn.unlearning.adapters): train W0 + B A on the expert matrices
    adapter: str | None = option(None, kind="str", optional=True, choices=_adapters, **_ID,
                                 help="lora: train a low-rank delta B A on each expert matrix of the scope "
                                      "(uoe/topm/experts); the patch stores the factors and the input statistics "
                                      "`moe-unlearn fuse` merges with")
    adapter_rank: int = option(8, kind="int", low=1, high=MAX_ITEMS, identity=True, record=True, record_if="adapter",
                               help="rank r of the adapter (8)")
    adapter_router: bool = option(False, kind="bool", **_ID,
                                  help="put the router under the adapter too (default: it trains in full)")
    adapter_gram_rank: int = option(256, kind="int", low=0, high=MAX_ITEMS,
                                    help="eigendirections kept of each input Gram matrix stored for fusion "
                                         "(256; 0 = none)")
    # data
    field: str | None = option(None, kind="str", optional=True, help="jsonl/dataset field holding the text")
    loss_tokens: str = option("answer", kind="str", choices=_loss_tokens, **_ID,
                              help="answer (default): QA records score their answer tokens only; all: every token")
    template: str | None = option(None, kind="str", optional=True, record=True,
                                  help="how QA records become text: a template with {question} and {answer} "
                                       "(default 'Question: {question}\\nAnswer: {answer}'), or chat: the "
                                       "tokenizer's chat template (also --chat-template)")
    # memory / speed
    prefix_cache: bool = option(True, kind="bool", cli=False,
                                help="run only the layers from the first trained one (CLI: --no-prefix-cache)")
    prefix_cache_mb: float = option(1024, kind="float", low=0.0, help="memory bound of the prefix cache (1024)")
    shard: str | None = option(None, kind="str", optional=True, choices=_shard_modes,
                               help="fsdp2 (under torchrun): shard every layer over the ranks with FSDP2, the trained "
                                    "tensors kept whole; for models larger than one device (default: a whole copy "
                                    "per rank)")
    gradient_checkpointing: bool = option(False, kind="bool",
                                          help="recompute the activations of the layers above the target in "
                                               "backward (less memory)")
    # outputs and checkpoints
    out_dir: str | None = option(None, kind="path", optional=True, cli=False,
                                 help="new (or empty) output directory (CLI: --out)")
    merge: bool = option(False, kind="bool", help="save the whole unlearned model instead of a patch")
    model_dir: str | None = option(None, kind="path", optional=True, cli=False,
                                   help="the model's directory (never written; CLI: --model)")
    resume: bool = option(False, kind="bool", help="continue from the latest checkpoint in OUT.ckpt")
    checkpoint_every: int = option(0, kind="int", low=0, high=MAX_STEPS, help="steps between checkpoints (in OUT.ckpt)")
    keep_checkpoints: int = option(1, kind="int", low=1, high=MAX_STEPS, help="how many of the latest checkpoints are kept (1)")
    checkpoint_dir: str | None = option(None, kind="path", optional=True, cli=False,
                                        help="where checkpoints go (default OUT.ckpt)")
    progress: bool = option(True, kind="bool", cli=False, help="progress bar (CLI: --quiet turns it off)")
    report_to: str | None = option(None, kind="str", optional=True,
                                   help="send each step's loss terms, lr and gradient norm to tensorboard and/or "
                                        "jsonl (comma-separated; moe_unlearn.log), under --logging-dir")
    logging_dir: str | None = option(None, kind="str", optional=True, help="folder for --report-to")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def options(cls) -> dict[str, Option]:
        """{field name: its Option}, in declaration order."""
        return {f.name: f.metadata["option"] for f in dataclasses.fields(cls)}

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
        if isinstance(cfg.method_kwargs, Mapping) or cfg.method_kwargs is None:
            cfg.method_kwargs = dict(cfg.method_kwargs or {})
        for k in ("out_dir", "model_dir", "checkpoint_dir", "logging_dir"):
            v = getattr(cfg, k)
            if isinstance(v, os.PathLike):
                setattr(cfg, k, os.fspath(v))
        return cfg

    def check_types(self) -> None:
        """Every field against its Option (type, range, choices); one BadInputError naming the first bad one."""
        for name, opt in self.options().items():
            opt.check(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the target is written as the list of "L:E" strings it names (an attribution
        as the targets chosen from it, `resolved_targets`)."""
        d = {k: getattr(self, k) for k in self.names()}
        d["method_kwargs"] = dict(self.method_kwargs)
        d["target"] = _target_strings(self.target)
        return d

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (a checkpoint whose identity differs is never resumed)."""
        return {k: getattr(self, k) for k, o in self.options().items() if o.identity}

    def record(self) -> dict[str, Any]:
        """The fields patch.json records as the run's hyperparameters (None where `record_if` is unset)."""
        return {k: getattr(self, k) if o.record_if is None or getattr(self, o.record_if) is not None else None
                for k, o in self.options().items() if o.record}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnlearnConfig:
        """A config from a mapping of field names (a run file), strictly typed: `merge: "false"` is an
        error, never a truthy string."""
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise BadInputError(f"unknown run options {unknown}; valid: {', '.join(cls.names())}")
        options = cls.options()
        for k, v in d.items():
            if v is not None or not options[k].optional:
                options[k].check(k, v)
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


def _yaml_loader():
    """PyYAML's SafeLoader, reading `1e-4` as a float (YAML 1.1 wants `1.0e-4`; a bare exponent would
    be a string, and a learning rate given that way would be refused as not a number)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """The run options of a .yaml/.yml/.json file: a flat mapping of UnlearnConfig fields (plus
    "model", "forget", "retain" for the CLI), or a patch.json (its "config" and "inputs")."""
    from moe_unlearn.validate import MAX_JSON_BYTES, parse_json, read_text_file

    p = Path(path)
    text = read_text_file(p, what="--config", max_bytes=MAX_JSON_BYTES, error=BadInputError)  # a regular file
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass: no arbitrary objects
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            raise BadInputError(f"--config {p} is not valid yaml: {' '.join(str(exc).split())[:200]}") from None
    else:
        data = parse_json(text, what=f"--config {p}", error=BadInputError)  # depth, NaN, surrogates: one error
    if not isinstance(data, dict):
        raise BadInputError(f"--config {p} must hold a mapping of option names to values")
    if "config" in data and isinstance(data["config"], dict):  # a patch.json: replay its run
        inputs = data.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise BadInputError(f"--config {p}: a patch.json's \"inputs\" must be a mapping, got "
                                f"{type(inputs).__name__}")
        return {**inputs, **data["config"]}
    return apply_aliases(data)  # TrainingArguments names (learning_rate, max_steps, ...): moe_unlearn.config_aliases


__all__ = ["Option", "UnlearnConfig", "option", "read_run_file"]
