"""A small dense (LLaMA-style) benchmark model that knows the fictitious facts: LoRAMoE's own setting.

LoRAMoE (Dou et al., ACL 2024) puts its LoRA experts on the FFN linears of a dense model. The MoE
benchmark model has no dense FFN (every FFN is routed), so this module builds the dense
counterpart: the same facts world (`generate_facts`), the same tokenizer recipe (`train_tokenizer`),
a `llama` model trained with the project's loop on every statement and QA form of `facts.trained`.

    bench = load_or_build_dense(DenseBenchConfig())   # trains once (about a minute on 2 cores), then cached
    bench.model, bench.tokenizer, bench.facts.trained

The cache entry `<cache>/<name>-<config hash>` holds the model and tokenizer (`save_pretrained`)
and `bench_meta.json`; the facts are regenerated from the config (deterministic). It is written to
a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from moe_unlearn.atomic import atomic_dir, write_json
from moe_unlearn.bench_model.build import answer_exact_match, default_cache_root
from moe_unlearn.bench_model.facts import FactsConfig, FactSet, generate_facts
from moe_unlearn.bench_model.tokenizer import train_tokenizer

DENSE_FORMAT_VERSION = 2  # 2: facts and tokenizer corpus in a fixed order
META_FILE = "bench_meta.json"


def _small_world() -> FactsConfig:
    return FactsConfig(entities_per_domain=12, neighbor_entities=4, holdout_entities=6)


@dataclass
class DenseBenchConfig:
    """Everything that determines the dense benchmark model; its hash names the cache entry.

    Training: `steps` AdamW steps (cosine) on the trained facts' texts; while the answer exact
    match on `facts.trained` is below `target_em`, up to `extra_rounds` x `extra_steps` more steps
    at a quarter of the learning rate.
    """

    name: str = "facts-dense"
    facts: FactsConfig = field(default_factory=_small_world)
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    steps: int = 700
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    extra_steps: int = 300
    extra_rounds: int = 2
    target_em: float = 0.95
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["facts"] = self.facts.to_dict()
        return d

    def digest(self) -> str:
        blob = json.dumps({"v": DENSE_FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class DenseBench:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    facts: FactSet
    path: Path
    meta: dict
    built: bool


def dense_cache_path(config: DenseBenchConfig, cache_root: str | os.PathLike | None = None) -> Path:
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / f"{config.name}-{config.digest()}"


def _model_config(config: DenseBenchConfig, tokenizer: PreTrainedTokenizerBase):
    return AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)


def world_facts(facts: FactSet) -> list:
    """The world knowledge of the dense model: every trained fact, ordered by id (so a regrouping of
    the unlearning splits does not change the model)."""
    return sorted(facts.trained, key=lambda f: f.id)


def _fact_texts(facts: FactSet) -> list[dict]:
    return [{"text": t} for f in world_facts(facts) for t in f.training_texts()]


def train_dense_model(config: DenseBenchConfig, facts: FactSet, tokenizer: PreTrainedTokenizerBase, *,
                      progress: bool = True) -> tuple[PreTrainedModel, dict]:
    """Train a fresh dense model on the trained facts through the shared fine-tuning path (all weights)."""
    from moe_unlearn.loramoe.finetune import FinetuneConfig, finetune

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(_model_config(config, tokenizer))
    records = _fact_texts(facts)
    start = time.perf_counter()
    common = dict(method="full", batch_size=config.batch_size, max_length=96, weight_decay=config.weight_decay,
                  lr_schedule="cosine", progress=progress)
    result = finetune(model, tokenizer, records, FinetuneConfig(**common, steps=config.steps, lr=config.lr,
                                                                warmup_steps=config.warmup_steps, seed=config.seed))
    steps_run, rounds = config.steps, 0
    em = answer_exact_match(model, tokenizer, world_facts(facts))
    while em < config.target_em and rounds < config.extra_rounds:
        rounds += 1
        result = finetune(model, tokenizer, records, FinetuneConfig(**common, steps=config.extra_steps,
                                                                    lr=config.lr / 4, seed=config.seed + rounds))
        steps_run += config.extra_steps
        em = answer_exact_match(model, tokenizer, world_facts(facts))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    stats = {"train_seconds": round(time.perf_counter() - start, 2), "steps": steps_run, "extra_rounds": rounds,
             "final_terms": result.history.final(), "num_training_texts": len(records),
             "num_parameters": sum(p.numel() for p in model.parameters()),
             "exact_match": {"trained": em, "holdout": answer_exact_match(model, tokenizer, facts.holdout)}}
    return model, stats


def load_or_build_dense(config: DenseBenchConfig | None = None, *, cache_root: str | os.PathLike | None = None,
                        rebuild: bool = False, progress: bool = True) -> DenseBench:
    """The dense benchmark model of `config` from the cache, trained and cached first if needed."""
    config = config or DenseBenchConfig()
    path = dense_cache_path(config, cache_root)
    facts = generate_facts(config.facts)
    if not rebuild and (path / META_FILE).is_file() and (path / "config.json").is_file():
        meta = json.loads((path / META_FILE).read_text())
        from moe_unlearn.loading import load_model, load_tokenizer

        model = load_model(path)  # local files only, no code from the folder
        return DenseBench(model, load_tokenizer(path), facts, path, meta, built=False)
    tokenizer = train_tokenizer(sorted(facts.all_texts()), config.vocab_size)
    model, stats = train_dense_model(config, facts, tokenizer, progress=progress)
    if stats["exact_match"]["trained"] < config.target_em:
        warnings.warn(f"dense benchmark model {config.name} knows only {stats['exact_match']['trained']:.1%} of its "
                      f"trained facts, below the target {config.target_em:.0%}; raise `steps`.", stacklevel=2)
    meta = {"format_version": DENSE_FORMAT_VERSION, "config": config.to_dict(), "digest": config.digest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, **stats}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / META_FILE, meta)
    return DenseBench(model, tokenizer, facts, path, meta, built=True)


__all__ = ["DenseBench", "DenseBenchConfig", "dense_cache_path", "load_or_build_dense", "train_dense_model",
           "world_facts"]
