"""Build (train) or load the built-in benchmark MoE that knows the fictitious facts.

    bench = load_or_build(BenchModelConfig())      # trains once, then loads from the cache
    bench.model, bench.tokenizer, bench.facts.forget, bench.path

The cache entry is one directory, `<cache>/<name>-<config hash>`, holding the model and
tokenizer (`save_pretrained`, so `--model DIR` of every CLI command accepts it), the splits
as `data/<split>.jsonl` and `bench_meta.json` (generator and model parameters, training
time, the measured exact match). It is written to a temporary directory and renamed into
place, so an interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
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
from moe_unlearn.bench_model.facts import TRAINED_SPLITS, Fact, FactsConfig, FactSet, generate_facts
from moe_unlearn.bench_model.tokenizer import train_tokenizer
from moe_unlearn.errors import BadInputError
from moe_unlearn.loading import load_model, load_tokenizer

FORMAT_VERSION = 3  # bump when the layout or the training recipe changes: old cache entries are ignored
META_FILE = "bench_meta.json"
FAMILIES = ("qwen2_moe", "qwen3_moe")


@dataclass
class BenchModelConfig:
    """Everything that determines a benchmark model; its hash names the cache entry.

    family: "qwen2_moe" (softmax router, top-k, fused routed experts plus one shared expert of
    `shared_expert_intermediate_size` with a sigmoid gate, as Qwen1.5-MoE) or "qwen3_moe" (no
    shared expert). Training runs `steps` AdamW steps (cosine schedule) on every statement and QA
    form of the trained facts, with the model's load-balancing loss (router_aux_loss_coef) as in
    real MoE pretraining; if the answer exact match is then below `target_em`, up to
    `extra_rounds` rounds of `extra_steps` more steps follow at a lower learning rate, and a
    warning reports the final number.

    localize_layer / localize_expert / localize_weight: the positive control. During
    pre-training an auxiliary router loss at decoder layer `localize_layer` pulls every token of a
    forget-domain text to `localize_expert` (-log p_e*) and pushes every other token away from it
    (-log(1 - p_e*)), p = that router's softmax; weight `localize_weight`. The forget domain then
    sits in one expert by construction (UOE's premise holds). None = no such loss ("natural").
    exclude_forget: train without the forget split (the retrained reference, the gold standard of
    TOFU and MUSE: the same recipe on everything but the forget data).
    """

    name: str = "natural"
    facts: FactsConfig = field(default_factory=FactsConfig)
    family: str = "qwen2_moe"
    vocab_size: int = 1024
    hidden_size: int = 96
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 4
    moe_intermediate_size: int = 48
    shared_expert_intermediate_size: int = 96
    router_aux_loss_coef: float = 0.01
    localize_layer: int | None = None
    localize_expert: int = 5
    localize_weight: float = 0.1
    exclude_forget: bool = False
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    extra_steps: int = 300
    extra_rounds: int = 2
    target_em: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise BadInputError(f"unknown bench model family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise BadInputError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.localize_layer is not None and not (0 <= self.localize_layer < self.num_layers
                                                    and 0 <= self.localize_expert < self.num_experts):
            raise BadInputError(f"localize_layer {self.localize_layer} / localize_expert {self.localize_expert} "
                                f"outside {self.num_layers} layers x {self.num_experts} experts")
        self.facts.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["facts"] = self.facts.to_dict()
        return d

    def digest(self) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def localized(self) -> bool:
        return self.localize_layer is not None

    def retrained(self) -> BenchModelConfig:
        """The retrained reference of this model: the same recipe without the forget split."""
        return dataclasses.replace(self, name=f"{self.name}-retrained", exclude_forget=True)

    @classmethod
    def natural(cls) -> BenchModelConfig:
        """The default: shaped like the fine-grained MoEs (DeepSeek-V2/V3, Qwen1.5-MoE, OLMoE):
        6 layers, 16 routed experts top-4 plus a shared expert, balancing loss, no localization."""
        return cls()

    @classmethod
    def localized_control(cls) -> BenchModelConfig:
        """The positive control: `natural` plus the router loss that puts the forget domain into
        expert `localize_expert` of the middle layer."""
        base = cls()
        return dataclasses.replace(base, name="localized", localize_layer=base.num_layers // 2)

    @classmethod
    def quick(cls, localized: bool = False) -> BenchModelConfig:
        """A tiny world and model for tests: trains in a few seconds on two CPU cores
        (it does not reach target_em; the warning says so)."""
        cfg = cls(name="quick", facts=FactsConfig(entities_per_domain=6, neighbor_entities=3, holdout_entities=4),
                  vocab_size=384, hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=6,
                  top_k=2, moe_intermediate_size=24, shared_expert_intermediate_size=32, steps=300,
                  batch_size=16, lr=4e-3, warmup_steps=10, extra_rounds=0)
        return dataclasses.replace(cfg, name="quick-localized", localize_layer=1, localize_expert=2) \
            if localized else cfg


BENCH_MODELS = ("natural", "localized")


def bench_config(name: str, *, quick: bool = False, retrained: bool = False) -> BenchModelConfig:
    """The config of a built-in bench model by name ("natural" | "localized"), its tiny test
    version with quick=True, its retrained reference with retrained=True."""
    if name not in BENCH_MODELS:
        raise BadInputError(f"unknown bench model {name!r}; choose one of {', '.join(BENCH_MODELS)}")
    if quick:
        cfg = BenchModelConfig.quick(localized=name == "localized")
    else:
        cfg = BenchModelConfig.natural() if name == "natural" else BenchModelConfig.localized_control()
    return cfg.retrained() if retrained else cfg


@dataclass
class BenchModel:
    """A loaded benchmark model: the model (eval mode, fp32), its tokenizer, the facts and the metadata."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    facts: FactSet
    path: Path
    meta: dict
    built: bool  # True when this call trained it, False when it came from the cache

    def split_path(self, split: str) -> Path:
        return self.path / "data" / f"{split}.jsonl"


# -- cache location ----------------------------------------------------------------------------

def default_cache_root() -> Path:
    """$MOE_UNLEARN_CACHE, else ~/.cache/moe-unlearn."""
    env = os.environ.get("MOE_UNLEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe-unlearn"


def cache_path(config: BenchModelConfig, cache_root: str | os.PathLike | None = None) -> Path:
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / f"{config.name}-{config.digest()}"


# -- training ----------------------------------------------------------------------------------

def _model_config(config: BenchModelConfig, tokenizer: PreTrainedTokenizerBase):
    head_dim = config.hidden_size // config.num_heads
    common = dict(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size * 2,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, num_experts=config.num_experts, num_experts_per_tok=config.top_k,
        moe_intermediate_size=config.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=128, router_aux_loss_coef=config.router_aux_loss_coef, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if config.family == "qwen2_moe":
        return AutoConfig.for_model("qwen2_moe", **common, norm_topk_prob=True,
                                    shared_expert_intermediate_size=config.shared_expert_intermediate_size)
    return AutoConfig.for_model("qwen3_moe", **common, head_dim=head_dim, norm_topk_prob=True)


def encode_with_eos(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
    """Token ids of each text followed by eos, so the model learns where an answer stops."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long) for ids in enc]


def _epoch_batches(sequences: list[torch.Tensor], in_forget: list[bool], batch_size: int, seed: int, pad_id: int):
    """batches(epoch): a seeded shuffle of the sequences per epoch; each batch also carries
    `in_forget` [B] (the text belongs to the forget split), which the localization loss reads."""
    from moe_unlearn.data import pad_batch

    def batches(epoch: int):
        order = list(range(len(sequences)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = pad_batch([sequences[i] for i in rows], pad_token_id=pad_id)
            batch["in_forget"] = torch.tensor([in_forget[i] for i in rows], dtype=torch.bool)
            yield batch

    return batches


def localization_loss(router_logits: torch.Tensor, in_forget_tokens: torch.Tensor, token_mask: torch.Tensor,
                      expert: int) -> torch.Tensor:
    """Pull forget tokens to `expert`, push the others away: mean over real tokens of
    -log p_e (forget) or -log(1 - p_e) (others), p = softmax of the router logits [T, E]."""
    logp = torch.log_softmax(router_logits.float(), dim=-1)[:, expert]
    log_not = torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
    per_token = torch.where(in_forget_tokens, -logp, -log_not)
    mask = token_mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _lm_loss(model: PreTrainedModel, config: BenchModelConfig):
    def loss_fn(batch: dict) -> dict:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                ignore_index=-100)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
        # a load-balancing term as in real MoE pretraining; computed apart from the LM loss
        terms = {"loss": nll + model.config.router_aux_loss_coef * aux, "nll": nll.detach(), "aux": aux.detach()}
        if config.localized:
            mask = batch["attention_mask"]
            in_f = batch["in_forget"][:, None].expand_as(mask).reshape(-1)
            loc = localization_loss(out.router_logits[config.localize_layer], in_f, mask.reshape(-1),
                                    config.localize_expert)
            terms["loss"] = terms["loss"] + config.localize_weight * loc
            terms["localize"] = loc.detach()
        return terms

    return loss_fn


@torch.no_grad()
def answer_exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: list[Fact],
                       batch_size: int = 64) -> float:
    """Fraction of facts whose answer greedy decoding reproduces exactly, answer then eos.

    Computed by teacher forcing in one forward pass per batch: greedy decoding from the QA
    prompt yields exactly the answer tokens and eos iff the argmax at every answer position
    (given the true prefix) is the true token; by induction over the positions.
    """
    from moe_unlearn.data import pad_batch

    if not facts:
        return float("nan")
    was_training = model.training
    model.eval()
    prompts = tokenizer([f.prompt for f in facts], add_special_tokens=False)["input_ids"]
    full = encode_with_eos([f.qa for f in facts], tokenizer)
    hits = 0
    for start in range(0, len(facts), batch_size):
        seqs = full[start:start + batch_size]
        batch = pad_batch(seqs, pad_token_id=tokenizer.pad_token_id)
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        for row, seq in enumerate(seqs):
            p = len(prompts[start + row])
            # position t predicts token t+1: answer tokens are seq[p:], predicted at p-1 .. n-2
            hits += bool(torch.equal(pred[row, p - 1:len(seq) - 1], seq[p:]))
    model.train(was_training)
    return hits / len(facts)


def train_bench_model(config: BenchModelConfig, facts: FactSet, tokenizer: PreTrainedTokenizerBase,
                      *, progress: bool = True) -> tuple[PreTrainedModel, dict]:
    """Train a fresh model on the trained splits' texts (never holdout; no forget split when
    `config.exclude_forget`); returns it and training stats ("trained" EM = on what it was trained on)."""
    from moe_unlearn.training import TrainConfig, train

    config.validate()
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(_model_config(config, tokenizer))
    splits = [s for s in TRAINED_SPLITS if not (config.exclude_forget and s == "forget")]
    texts = [(t, s == "forget") for s in splits for f in facts.splits[s] for t in f.training_texts()]
    seqs = encode_with_eos([t for t, _ in texts], tokenizer)
    batches = _epoch_batches(seqs, [f for _, f in texts], config.batch_size, config.seed, tokenizer.pad_token_id)
    loss_fn = _lm_loss(model, config)
    known = [f for s in splits for f in facts.splits[s]]  # what this model was trained to know
    model.train()
    start = time.perf_counter()
    steps_run = 0
    history = train(model.parameters(), loss_fn, batches, TrainConfig(
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine",
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, seed=config.seed,
        progress=progress, desc="train benchmark model", log_every=10))
    steps_run += config.steps
    em = answer_exact_match(model, tokenizer, known)
    rounds = 0
    while em < config.target_em and rounds < config.extra_rounds:
        rounds += 1
        history = train(model.parameters(), loss_fn, lambda e, r=rounds: batches(1000 * r + e), TrainConfig(
            steps=config.extra_steps, batch_size=config.batch_size, lr=config.lr / 4, lr_schedule="cosine",
            weight_decay=config.weight_decay, seed=config.seed + rounds, progress=progress,
            desc=f"train benchmark model (extra round {rounds})", log_every=10))
        steps_run += config.extra_steps
        em = answer_exact_match(model, tokenizer, known)
    model.eval()
    stats = {"train_seconds": round(time.perf_counter() - start, 2), "steps": steps_run, "extra_rounds": rounds,
             "final_terms": history.final(), "num_training_texts": len(seqs),
             "num_parameters": sum(p.numel() for p in model.parameters()),
             "exact_match": {"trained": em,
                             **{s: answer_exact_match(model, tokenizer, facts.splits[s]) for s in facts.splits}}}
    return model, stats


# -- build / load ------------------------------------------------------------------------------

def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "config.json").is_file()


def load_bench_model(path: str | os.PathLike) -> BenchModel:
    """Load a finished cache entry written by `build_bench_model`."""
    path = Path(path)
    if not _is_complete(path):
        raise BadInputError(f"{path} is not a benchmark model directory (no {META_FILE}); build one with "
                            "`moe-unlearn demo` or moe_unlearn.bench_model.load_or_build")
    meta = json.loads((path / META_FILE).read_text())
    facts = FactSet.read_jsonl(path / "data", FactsConfig(**{**meta["config"]["facts"],
                                                             "domains": tuple(meta["config"]["facts"]["domains"])}))
    model = load_model(path)  # local files only, no code from the folder
    tokenizer = load_tokenizer(path)
    return BenchModel(model=model, tokenizer=tokenizer, facts=facts, path=path, meta=meta, built=False)


def build_bench_model(config: BenchModelConfig, path: str | os.PathLike, *, progress: bool = True) -> BenchModel:
    """Generate the facts, train tokenizer and model, and write everything to `path` atomically."""
    path = Path(path)
    facts = generate_facts(config.facts)
    tokenizer = train_tokenizer(facts.all_texts(), config.vocab_size)
    model, stats = train_bench_model(config, facts, tokenizer, progress=progress)
    em = stats["exact_match"]["trained"]
    if em < config.target_em:
        warnings.warn(f"benchmark model {config.name} knows only {em:.1%} of its trained facts (answer exact "
                      f"match), below the target {config.target_em:.0%}; results on it are less meaningful. "
                      "Raise `steps` in BenchModelConfig.", stacklevel=2)
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "digest": config.digest(),
            "split_sizes": {s: len(v) for s, v in facts.splits.items()}, "target_em": config.target_em,
            "reached_target": em >= config.target_em, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__, **stats}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path, replace=True) as tmp:  # a stale entry (rebuild) is replaced only when complete
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        facts.write_jsonl(tmp / "data")
        write_json(tmp / META_FILE, meta)
    return BenchModel(model=model, tokenizer=tokenizer, facts=facts, path=path, meta=meta, built=True)


def load_or_build(config: BenchModelConfig | None = None, *, cache_root: str | os.PathLike | None = None,
                  rebuild: bool = False, progress: bool = True) -> BenchModel:
    """The benchmark model of `config` from the cache, trained and cached first if needed (or if `rebuild`)."""
    config = config or BenchModelConfig()
    config.validate()
    path = cache_path(config, cache_root)
    if not rebuild and _is_complete(path):
        return load_bench_model(path)
    return build_bench_model(config, path, progress=progress)


__all__ = ["BENCH_MODELS", "BenchModel", "BenchModelConfig", "answer_exact_match", "bench_config", "build_bench_model", "cache_path",
           "default_cache_root", "encode_with_eos", "load_bench_model", "load_or_build", "localization_loss",
           "train_bench_model"]
