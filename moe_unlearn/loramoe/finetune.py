"""Fine-tuning a transformers model with LoRAMoE (+ LBC), plain LoRA, or all weights.

The three methods share one path: records -> examples -> batches -> `moe_unlearn.training.train`.
"lora" is LoRAMoE with one expert and no router; "full" trains every weight and wraps nothing.

    result = finetune(model, tokenizer, records, FinetuneConfig(method="loramoe", steps=200), out_dir="run/")
    # adapter knobs: FinetuneConfig(adapter=LoRAMoEConfig(num_experts=6, groups=[3, 3], ...), ...)

Records: {"text": ...} (loss on every token), {"prompt": ..., "response": ...} (loss on the
response only) or {"question": ..., "answer": ...} (moe_unlearn.data's QA template: loss on the
answer), each with an optional "type" (the sample type of the balancing constraint).
The output folder holds `adapter/` (or `model/` for "full"), `finetune_config.json`,
`history.json`, `routing_mass.json` + `routing_*.png` (methods with a router) and
`checkpoints/` (resume source). Final files are staged and moved in all or nothing (atomic.staged_files).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_unlearn.atomic import check_out_dir, staged_files
from moe_unlearn.data import check_data_file, encode_capped, load_records, pad_batch, pad_token_id
from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.loading import input_device
from moe_unlearn.loramoe.balance import routing_context
from moe_unlearn.loramoe.config import LoRAMoEConfig
from moe_unlearn.loramoe.model import adapter_parameters, add_loramoe, save_loramoe
from moe_unlearn.loramoe.observe import RoutingMassObserver, observe_routing
from moe_unlearn.training import TrainConfig, TrainHistory, train
from moe_unlearn.validate import MAX_ITEMS, MAX_STEPS, MAX_TOKENS, bounded

METHODS = ("loramoe", "lora", "full")


# knobs FinetuneConfig passes straight to TrainConfig; their defaults (except steps and lr) are TrainConfig's
TRAIN_KNOBS = ("steps", "lr", "lr_schedule", "warmup_steps", "weight_decay", "batch_size", "seed",
               "checkpoint_every", "resume", "progress")
_TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def _default_adapter() -> LoRAMoEConfig:
    return LoRAMoEConfig(dropout=0.05)  # fine-tuning default; the plugin's own default is 0.0


@dataclass
class FinetuneConfig:
    """Knobs of one fine-tuning run: the method, the adapter (a LoRAMoEConfig, validated there) and
    the training knobs (passed to `moe_unlearn.training.TrainConfig`, see `train_config`).
    The adapter is ignored by method="full"; method="lora" keeps its rank, alpha, dropout and
    target_modules and forces one expert, no router and no LBC."""

    method: str = "loramoe"
    adapter: LoRAMoEConfig = field(default_factory=_default_adapter)
    steps: int = bounded(100, low=1, high=MAX_STEPS)
    lr: float = 2e-4
    lr_schedule: str = _TRAIN_DEFAULTS["lr_schedule"]
    warmup_steps: int = bounded(_TRAIN_DEFAULTS["warmup_steps"], low=0, high=MAX_STEPS)
    weight_decay: float = _TRAIN_DEFAULTS["weight_decay"]
    batch_size: int = bounded(_TRAIN_DEFAULTS["batch_size"], low=1, high=MAX_ITEMS)
    max_length: int = bounded(256, low=2, high=MAX_TOKENS)
    seed: int = _TRAIN_DEFAULTS["seed"]
    checkpoint_every: int = bounded(_TRAIN_DEFAULTS["checkpoint_every"], low=0, high=MAX_STEPS)
    resume: bool = _TRAIN_DEFAULTS["resume"]
    progress: bool = _TRAIN_DEFAULTS["progress"]

    def __post_init__(self) -> None:
        from moe_unlearn.validate import check_fields

        if not isinstance(self.adapter, LoRAMoEConfig):
            raise BadInputError(f"adapter must be a LoRAMoEConfig, got {type(self.adapter).__name__}")
        check_fields(self)

    def adapter_config(self) -> LoRAMoEConfig | None:
        """The LoRAMoEConfig this run injects (None for full fine-tuning); validates the method."""
        if self.method not in METHODS:
            raise BadInputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "full":
            return None
        if self.method == "lora":
            a = self.adapter
            return LoRAMoEConfig(num_experts=1, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
                                 target_modules=a.target_modules, router="none")
        return self.adapter

    def train_config(self, checkpoint_dir: str | None, data_hash: str | None = None) -> TrainConfig:
        """The TrainConfig of this run: the training knobs, checkpointing only with a folder."""
        knobs = {name: getattr(self, name) for name in TRAIN_KNOBS}
        knobs["checkpoint_every"] = self.checkpoint_every if checkpoint_dir else 0
        knobs["resume"] = self.resume and checkpoint_dir is not None
        # what a resumed run must share with the checkpoint's (the training knobs are compared by train itself)
        identity = {"method": self.method, "adapter": self.adapter.to_dict(), "max_length": self.max_length,
                    **({"data": data_hash} if data_hash else {})}
        return TrainConfig(**knobs, checkpoint_dir=checkpoint_dir, desc=f"finetune {self.method}", bf16="auto",
                           run_identity=identity)

    # -- JSON (the adapter nested, through LoRAMoEConfig's own dict form) ---------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adapter"] = self.adapter.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BadInputError(f"unknown fine-tuning config keys {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        if "adapter" in data:
            if not isinstance(data["adapter"], dict):
                raise BadInputError(f"fine-tuning config 'adapter' must be an object, got {data['adapter']!r}")
            data["adapter"] = LoRAMoEConfig.from_dict(data["adapter"])
        return cls(**data)


@dataclass
class Example:
    """One tokenized sample: ids [n] int64; loss on positions >= num_prompt; its type (or None)."""

    ids: torch.Tensor
    num_prompt: int
    type: str | None


@dataclass
class FinetuneResult:
    history: TrainHistory
    out_dir: Path | None
    trainable_params: int
    routing: dict[str, list[float]] | None  # type -> group mass share after training (methods with a router)
    observer: RoutingMassObserver | None  # accumulated over the whole training run


# -- data ---------------------------------------------------------------------------------------


def load_finetune_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a .jsonl/.json file with the `datasets` library (other sources through moe_unlearn.data)
    and check every record has `text` or `prompt` + `response`."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json") and not path.is_dir():
        from datasets import Dataset

        check_data_file(path)  # a regular file within the data-size limit, before datasets reads it

        with tempfile.TemporaryDirectory(prefix="moe_unlearn_ds_") as cache:
            try:
                ds = Dataset.from_json(str(path), cache_dir=cache, keep_in_memory=True)
            except Exception as exc:  # datasets raises several types for malformed json
                raise DataError(f"cannot read {path} as JSON lines: {exc}; each line must be one JSON object "
                                f"with 'text' or 'prompt' and 'response' (optional 'type')") from exc
            records = load_records(ds)
    else:
        records = load_records(path)
    check_records(records, str(path))
    return records


def _prompt_response(rec: dict[str, Any]) -> tuple[str, str] | None:
    """(prompt, response) of a prompt/response record, or of a question/answer record split as every
    other command splits it (moe_unlearn.data's default template); None for neither."""
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return rec["prompt"], rec["response"]
    if isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str):
        from moe_unlearn.data import load_examples

        ex = load_examples([{"question": rec["question"], "answer": rec["answer"]}])[0]
        return ex.prompt, ex.completion
    return None


def check_records(records: Sequence[dict[str, Any]], where: str = "data") -> None:
    for i, rec in enumerate(records):
        has_text = isinstance(rec.get("text"), str)
        if not (has_text or _prompt_response(rec) is not None):
            raise DataError(f"{where} record {i}: needs a string 'text', string 'prompt' and 'response', or string "
                            "'question' and 'answer'; "
                            f"it has {sorted(k for k, v in rec.items() if v is not None)}")
        t = rec.get("type")
        if t is not None and not isinstance(t, str):
            raise DataError(f"{where} record {i}: 'type' must be a string, got {type(t).__name__}")


def encode_records(records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize records; an eos token ends every sample; truncation keeps the start."""
    check_records(records)
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [int(eos)] if eos is not None else []
    out = []

    def enc(text: str) -> list[int]:  # a very long text is cut before it is tokenized
        return encode_capped(tokenizer, [text], max_length, add_special_tokens=False)[0]

    for rec in records:
        if isinstance(rec.get("text"), str):
            prompt, body = [], enc(rec["text"])
        else:
            prompt_text, response = _prompt_response(rec)
            prompt = enc(prompt_text)
            body = enc(response)
        ids = (list(prompt) + list(body) + tail)[:max_length]
        if len(ids) <= len(prompt):
            raise DataError(f"a record's prompt fills all {max_length} tokens, so nothing is left to learn; "
                            f"raise max_length or shorten the prompt (prompt starts {_prompt_response(rec)[0][:40]!r})")
        out.append(Example(torch.tensor(ids, dtype=torch.long), len(prompt), rec.get("type")))
    return out


def _examples_hash(examples: Sequence[Example]) -> str:
    """sha256 of the tokenized data (ids, prompt lengths, types): which data a checkpoint was trained on."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.num_prompt}|{e.type}|{e.ids.numel()}|".encode())
        h.update(e.ids.numpy().tobytes())
    return h.hexdigest()


def make_batches(examples: Sequence[Example], batch_size: int, pad_id: int, seed: int,
                 shuffle: bool = True) -> Callable[[int], list[dict[str, Any]]]:
    """`batches(epoch)` for the training loop: the same order for the same epoch and seed."""

    def batches(epoch: int) -> list[dict[str, Any]]:
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed * 100_003 + epoch).shuffle(order)
        out = []
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            batch = pad_batch([e.ids for e in chunk], pad_token_id=pad_id, padding_side="right")
            for row, e in enumerate(chunk):
                batch["labels"][row, :e.num_prompt] = -100
            batch["types"] = [e.type for e in chunk]
            out.append(batch)
        return out

    return batches


def causal_lm_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over label positions (labels != -100), computed here so that a
    model's own router aux loss never leaks in."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


# -- the run ------------------------------------------------------------------------------------


def prepare_model(model: nn.Module, config: FinetuneConfig) -> list[nn.Parameter]:
    """Inject the adapter (or unfreeze everything for "full"); returns the parameters to train."""
    adapter = config.adapter_config()
    if adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [p for p in model.parameters()]
    add_loramoe(model, adapter)
    return list(adapter_parameters(model).values())


def finetune(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], config: FinetuneConfig,
             out_dir: str | os.PathLike | None = None) -> FinetuneResult:
    """Fine-tune `model` in place; with out_dir, write the run's files there (see the module docstring)."""
    adapter = config.adapter_config()  # validates before anything is touched
    examples = encode_records(records, tokenizer, config.max_length)
    if adapter is not None and adapter.lbc_weight > 0:
        served = set(adapter.group_types or [])
        if not any(e.type in served for e in examples):
            raise DataError(f"lbc_weight > 0 but no record has a 'type' in group_types {sorted(served)}; "
                            f"label the records or set lbc_weight to 0")
    if adapter is not None and adapter.group_types:
        stray = sorted({e.type for e in examples if e.type is not None} - set(adapter.group_types))
        if stray:  # most likely a typo ("World" for "world"): such records would silently skip the constraint
            raise DataError(f"record type(s) {stray} match no group in group_types {adapter.group_types}; "
                            "fix the labels, add a group for them, or drop their 'type' field")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        src = getattr(getattr(model, "config", None), "_name_or_path", None)
        check_out_dir(out, model_dirs=(src if src and Path(src).is_dir() else None,), what="output folder")
    if out is not None and out.exists() and any(out.iterdir()) and not config.resume:
        raise BadInputError(f"output folder {out} is not empty; choose a new --out or pass --resume to continue")

    torch.manual_seed(config.seed)  # adapter init: the same seed gives the same run
    params = prepare_model(model, config)
    batches = make_batches(examples, config.batch_size, pad_token_id(tokenizer), config.seed)
    observer = RoutingMassObserver() if adapter is not None and adapter.router != "none" else None
    weight = adapter.lbc_weight if adapter is not None else 0.0
    device = input_device(model)  # the input embedding's device (the first of a device_map model)

    def loss_fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        if adapter is None:
            logits = model(input_ids=ids, attention_mask=mask).logits
            nll = causal_lm_nll(logits, batch["labels"].to(logits.device))  # device_map: logits on the last GPU
            return {"loss": nll, "nll": nll}
        with routing_context(model, mask, batch["types"]) as ctx:
            logits = model(input_ids=ids, attention_mask=mask).logits
        nll = causal_lm_nll(logits, batch["labels"].to(logits.device))
        if observer is not None:
            observer.update(ctx)
        if weight <= 0:
            return {"loss": nll, "nll": nll}
        lbc = ctx.balance_loss().to(nll.device)
        return {"loss": nll + weight * lbc, "nll": nll, "lbc": lbc}

    ckpt_dir = str(out / "checkpoints") if out is not None and (config.checkpoint_every or config.resume) else None
    was_training = model.training
    model.train()
    try:
        history = train(params, loss_fn, batches, config.train_config(ckpt_dir, _examples_hash(examples)))
    finally:
        model.train(was_training)
    model.eval()

    expert_group = adapter.expert_group() if adapter is not None else []
    routing = None
    if observer is not None:  # the trained router on (up to 16 batches of) the training data
        routing = observe_routing(model, batches(0), max_batches=16).summary(expert_group)
    result = FinetuneResult(history=history, out_dir=out, trainable_params=sum(p.numel() for p in params),
                            routing=routing, observer=observer)
    if out is not None:
        _write_run(out, model, tokenizer, config, adapter, result)
    return result


def _write_run(out: Path, model: nn.Module, tokenizer: Any, config: FinetuneConfig, adapter: LoRAMoEConfig | None,
               result: FinetuneResult) -> None:
    with staged_files(out, last="finetune_config.json") as stage:  # the summary goes in last
        if adapter is None:
            model.save_pretrained(stage / "model")
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(stage / "model")
        else:
            save_loramoe(model, stage / "adapter")
        if result.observer is not None and result.observer.mass:
            result.observer.save(stage, adapter.expert_group(), adapter.group_types)
        (stage / "history.json").write_text(json.dumps(result.history.to_dict(), indent=1) + "\n")
        summary = {"config": config.to_dict(), "trainable_params": result.trainable_params,
                   "final": result.history.final(), "routing_group_mass_after_training": result.routing}
        (stage / "finetune_config.json").write_text(json.dumps(summary, indent=2) + "\n")
