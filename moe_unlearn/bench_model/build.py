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
import shutil
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
from moe_unlearn.validate import read_json_file

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

    reading_steps > 0: the two-phase recipe that puts the facts into the MoE blocks. Phase 1
    trains every parameter for `reading_steps` on a *different* generated world (FactsConfig seed
    `reading_world_seed`: other names, other answers) so that attention, embeddings and norms learn
    to read the formats; phase 2 (`steps`, plus the extra rounds) learns this world's facts with only
    the MoE blocks training (routers, routed experts, shared experts and their gate). Attention,
    embeddings and norms never get a gradient from these facts, so whatever an ablation of them
    removes is reading, not storage. Routing stays learned (no localization loss).
    store_layers / store_shared: narrow phase 2 to the MoE blocks of these decoder layers (None =
    every layer) and, with store_shared False, leave the shared experts and their gate as phase 1 left
    them: the facts of this world can then only be stored in those layers' routed experts (their
    routers still learn freely).
    implant_layer: the knowledge-localized control. Start from the retrained reference of this
    recipe (never saw the forget facts) and train only routed expert `implant_expert` of
    `implant_layer` and that expert's router row on the forget QA records (plus a retain LM term and
    the localization loss of that router), `implant_steps` Adam steps at `implant_lr`: the forget
    facts then live in that one expert, and zeroing it gives back the reference.
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
    # fields below are left out of the digest at their defaults, so older cache entries keep their names
    reading_steps: int = 0
    reading_world_seed: int = 1000
    reading_lr: float = 3e-3
    implant_layer: int | None = None
    implant_expert: int = 5
    implant_steps: int = 600
    implant_lr: float = 1e-2
    implant_retain_batch: int = 8
    implant_localize_weight: float = 1.0
    store_layers: tuple[int, ...] | None = None
    store_shared: bool = True

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise BadInputError(f"unknown bench model family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise BadInputError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.localize_layer is not None and not (0 <= self.localize_layer < self.num_layers
                                                    and 0 <= self.localize_expert < self.num_experts):
            raise BadInputError(f"localize_layer {self.localize_layer} / localize_expert {self.localize_expert} "
                                f"outside {self.num_layers} layers x {self.num_experts} experts")
        if self.implant_layer is not None and not (0 <= self.implant_layer < self.num_layers
                                                   and 0 <= self.implant_expert < self.num_experts):
            raise BadInputError(f"implant_layer {self.implant_layer} / implant_expert {self.implant_expert} "
                                f"outside {self.num_layers} layers x {self.num_experts} experts")
        if self.reading_steps < 0 or self.implant_steps < 1:
            raise BadInputError("reading_steps must be >= 0 and implant_steps >= 1")
        if self.store_layers is not None and not (self.reading_steps and self.store_layers and all(
                0 <= i < self.num_layers for i in self.store_layers)):
            raise BadInputError(f"store_layers {self.store_layers} must name layers in 0..{self.num_layers - 1} "
                                "of a two-phase recipe (reading_steps > 0)")
        if not self.store_shared and not self.reading_steps:
            raise BadInputError("store_shared=False needs the two-phase recipe (reading_steps > 0)")
        if self.reading_steps and self.reading_world_seed == self.facts.seed:
            raise BadInputError("reading_world_seed must differ from facts.seed: phase 1 reads another world")
        self.facts.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["facts"] = self.facts.to_dict()
        return d

    def digest(self) -> str:
        d = self.to_dict()
        defaults = BenchModelConfig.__dataclass_fields__
        for name in _LATE_FIELDS:  # at their defaults they change nothing: keep older digests
            if d[name] == defaults[name].default:
                del d[name]
        blob = json.dumps({"v": FORMAT_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def reading_digest(self) -> str:
        """Names phase 1's result: only what phase 1 depends on (a model and its retrained reference
        share it)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _PHASE2_FIELDS}
        return hashlib.sha256(json.dumps({"v": FORMAT_VERSION, **d}, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def two_phase(self) -> bool:
        return self.reading_steps > 0

    @property
    def implanted(self) -> bool:
        return self.implant_layer is not None

    def reading_facts(self) -> FactsConfig:
        """The other world phase 1 reads (same shape, other seed: other names and answers)."""
        return dataclasses.replace(self.facts, seed=self.reading_world_seed)

    @property
    def localized(self) -> bool:
        return self.localize_layer is not None

    def retrained(self) -> BenchModelConfig:
        """The retrained reference of this model: the same recipe without the forget split (an
        implanted model's reference is the reference it was implanted into)."""
        if self.implanted:
            name = self.name.replace("-implanted", "") if "-implanted" in self.name else \
                self.name.replace("implanted", "natural")
            base = dataclasses.replace(self, name=name, implant_layer=None,
                                       **{f: BenchModelConfig.__dataclass_fields__[f].default for f in _IMPLANT_FIELDS})
            return base.retrained()
        return dataclasses.replace(self, name=f"{self.name}-retrained", exclude_forget=True)

    @classmethod
    def natural(cls) -> BenchModelConfig:
        """The default: shaped like the fine-grained MoEs (DeepSeek-V2/V3, Qwen1.5-MoE, OLMoE):
        6 layers, 16 routed experts top-4 plus a shared expert, balancing loss, no localization;
        two phases (reading on another world, then this world's facts in the routed experts of the
        middle layers 2-4 only, their routers learning freely; shared experts, attention, embeddings
        and norms as phase 1 left them)."""
        return dataclasses.replace(cls.moe_blocks(), store_layers=(2, 3, 4), store_shared=False)

    @classmethod
    def moe_blocks(cls) -> BenchModelConfig:
        """The earlier two-phase `natural`: phase 2 trains the MoE blocks of every layer (routed and
        shared experts, routers). Its facts spread over all six layers' experts; the implanted
        control is built on its retrained reference."""
        return cls(reading_steps=1000, steps=1800)

    @classmethod
    def allparam(cls) -> BenchModelConfig:
        """The named negative case (the earlier `natural`): every parameter learns the facts in one
        phase; at this size the facts then end up mostly in attention, not in the experts."""
        return cls(name="allparam")

    @classmethod
    def implanted_control(cls) -> BenchModelConfig:
        """The knowledge-localized control: the forget facts implanted into one routed expert of the
        middle layer of the retrained reference of `moe_blocks` (the earlier two-phase natural)."""
        base = cls.moe_blocks()
        return dataclasses.replace(base, name="implanted", implant_layer=base.num_layers // 2)

    @classmethod
    def localized_control(cls) -> BenchModelConfig:
        """The routing-localized control: `allparam`'s recipe plus the router loss that sends the forget
        domain's tokens to expert `localize_expert` of the middle layer. It localizes routing, not
        knowledge (zeroing that whole layer's routed experts leaves the facts): see `locate`."""
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


_LATE_FIELDS = ("reading_steps", "reading_world_seed", "reading_lr", "implant_layer", "implant_expert",
                "implant_steps", "implant_lr", "implant_retain_batch", "implant_localize_weight",
                "store_layers", "store_shared")
_IMPLANT_FIELDS = _LATE_FIELDS[4:9]
_PHASE2_FIELDS = ("name", "exclude_forget", "steps", "lr", "extra_steps", "extra_rounds", "target_em",
                  "localize_layer", "localize_expert", "localize_weight", *_LATE_FIELDS[3:])

BENCH_MODELS = ("natural", "implanted", "localized", "allparam")


REALIZATION_DOMAINS = ("compounds", "compounds", "species")  # realization r forgets REALIZATION_DOMAINS[r % 3]


def realize(config: BenchModelConfig, realization: int) -> BenchModelConfig:
    """Realization r of a bench recipe: r = 0 is the recipe itself; r > 0 draws another world (facts
    seed + r), another initialisation and data order (seed + r), and r = 2, 5, ... forgets another
    domain. Conclusions should hold across realizations, not on one set of weights."""
    if not isinstance(realization, int) or realization < 0:
        raise BadInputError(f"realization must be an integer >= 0, got {realization!r}")
    if realization == 0:
        return config
    domain = REALIZATION_DOMAINS[realization % len(REALIZATION_DOMAINS)]
    facts = dataclasses.replace(config.facts, seed=config.facts.seed + realization, forget_domain=domain)
    return dataclasses.replace(config, name=f"{config.name}-r{realization}", facts=facts,
                               seed=config.seed + realization)


def bench_config(name: str, *, quick: bool = False, retrained: bool = False, realization: int = 0) -> BenchModelConfig:
    """The config of a built-in bench model by name, its tiny test version with quick=True, its
    retrained reference with retrained=True, another realization of it with realization=r (`realize`).
    natural: facts in the MoE blocks (two phases); implanted: the forget facts in one expert;
    localized: routing (not knowledge) localized; allparam: the one-phase recipe whose facts sit
    mostly in attention (negative case)."""
    if name not in BENCH_MODELS:
        raise BadInputError(f"unknown bench model {name!r}; choose one of {', '.join(BENCH_MODELS)}")
    if realization:
        return realize(bench_config(name, quick=quick), realization).retrained() if retrained else \
            realize(bench_config(name, quick=quick), realization)
    if quick:
        cfg = BenchModelConfig.quick(localized=name == "localized")
        if name == "implanted":
            cfg = dataclasses.replace(cfg, name="quick-implanted", implant_layer=1, implant_expert=2,
                                      implant_steps=60)
    else:
        cfg = {"natural": BenchModelConfig.natural, "allparam": BenchModelConfig.allparam,
               "implanted": BenchModelConfig.implanted_control,
               "localized": BenchModelConfig.localized_control}[name]()
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


def moe_block_parameters(model: PreTrainedModel, layers: tuple[int, ...] | None = None,
                         shared: bool = True) -> list[torch.nn.Parameter]:
    """The parameters of the MoE blocks (routers, routed experts, shared experts and their gate) of
    `layers` (None = all), without the shared experts and their gate when `shared` is False: what
    phase 2 of the two-phase recipe trains."""
    from moe_unlearn.arch import find_moe_layers

    seen: dict[int, torch.nn.Parameter] = {}
    for layer in find_moe_layers(model):
        if layers is not None and layer.layer_idx not in layers:
            continue
        skip = set()
        if not shared:
            for m in (layer.shared_experts, layer.shared_expert_gate):
                if m is not None:
                    skip.update(id(p) for p in m.parameters())
        for p in layer.block.parameters():
            if id(p) not in skip:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _texts_of(facts: FactSet, splits: list[str]) -> list[tuple[str, bool]]:
    return [(t, s == "forget") for s in splits for f in facts.splits[s] for t in f.training_texts()]


def _phase(model, config: BenchModelConfig, tokenizer, texts: list[tuple[str, bool]], params, *, steps: int,
           lr: float, seed: int, desc: str, progress: bool, ckpt: Path | None, warmup: int):
    seqs = encode_with_eos([t for t, _ in texts], tokenizer)
    batches = _epoch_batches(seqs, [f for _, f in texts], config.batch_size, seed, tokenizer.pad_token_id)
    resumable = {} if ckpt is None else dict(checkpoint_every=100, checkpoint_dir=str(ckpt), resume=True,
                                              run_identity={"bench": config.digest(), "phase": desc})
    from moe_unlearn.training import TrainConfig, train

    return train(params, _lm_loss(model, config), batches, TrainConfig(
        steps=steps, batch_size=config.batch_size, lr=lr, lr_schedule="cosine", warmup_steps=warmup,
        weight_decay=config.weight_decay, seed=seed, progress=progress, desc=desc, log_every=10, **resumable)), len(seqs)


def _train_bench_model(config: BenchModelConfig, facts: FactSet, tokenizer: PreTrainedTokenizerBase,
                      *, progress: bool = True, work_dir: Path | None = None) -> tuple[PreTrainedModel, dict]:
    """Train a fresh model on the trained splits' texts (never holdout; no forget split when
    `config.exclude_forget`); returns it and training stats ("trained" EM = on what it was trained on).
    work_dir: where phases checkpoint (every 100 steps), so an interrupted build resumes there."""
    config.validate()
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(_model_config(config, tokenizer))
    splits = [s for s in TRAINED_SPLITS if not (config.exclude_forget and s == "forget")]
    known = [f for s in splits for f in facts.splits[s]]  # what this model was trained to know
    model.train()
    start = time.perf_counter()
    stats: dict = {}
    params = list(model.parameters())
    if config.two_phase:  # phase 1: every parameter reads another world
        reading = generate_facts(config.reading_facts())
        # phase 1 does not depend on the split being trained in phase 2: kept beside the cache entries
        # under its own digest, a model and its retrained reference train it once
        shared = work_dir.parent / f".reading-{config.reading_digest()}" if work_dir is not None else None
        done = shared / "phase1.pt" if shared is not None else None
        if done is not None and done.is_file():
            model.load_state_dict(torch.load(done, weights_only=True))
        else:
            _phase(model, config, tokenizer, _texts_of(reading, list(TRAINED_SPLITS)), params,
                   steps=config.reading_steps, lr=config.reading_lr, seed=config.seed + 7919,
                   desc="train benchmark model (phase 1: reading another world)", progress=progress,
                   ckpt=None if shared is None else shared / "ckpt", warmup=config.warmup_steps)
            if done is not None:
                done.parent.mkdir(parents=True, exist_ok=True)
                atomic_save = done.with_suffix(".tmp")
                torch.save(model.state_dict(), atomic_save)
                os.replace(atomic_save, done)
        stats["reading_em"] = answer_exact_match(model, tokenizer, reading.trained)
        params = moe_block_parameters(model, config.store_layers, config.store_shared)
        moe_ids = {id(p) for p in params}
        for p in model.parameters():  # attention, embeddings, norms: no gradient from this world
            p.requires_grad_(id(p) in moe_ids)
    texts = _texts_of(facts, splits)
    history, n_texts = _phase(model, config, tokenizer, texts, params, steps=config.steps, lr=config.lr,
                              seed=config.seed, progress=progress, warmup=config.warmup_steps,
                              desc="train benchmark model" + (" (phase 2: MoE blocks only)" if config.two_phase else ""),
                              ckpt=None if work_dir is None else work_dir / "phase2")
    steps_run = config.reading_steps + config.steps
    em = answer_exact_match(model, tokenizer, known)
    rounds = 0
    while em < config.target_em and rounds < config.extra_rounds:
        rounds += 1
        history, _ = _phase(model, config, tokenizer, texts, params, steps=config.extra_steps, lr=config.lr / 4,
                            seed=config.seed + 1000 * rounds, progress=progress, warmup=0,
                            desc=f"train benchmark model (extra round {rounds})",
                            ckpt=None if work_dir is None else work_dir / f"extra{rounds}")
        steps_run += config.extra_steps
        em = answer_exact_match(model, tokenizer, known)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    stats.update({"train_seconds": round(time.perf_counter() - start, 2), "steps": steps_run, "extra_rounds": rounds,
                  "final_terms": history.final(), "num_training_texts": n_texts,
                  "num_parameters": sum(p.numel() for p in model.parameters()),
                  "exact_match": {"trained": em,
                                  **{s: answer_exact_match(model, tokenizer, facts.splits[s]) for s in facts.splits}}})
    return model, stats


def implant_expert(model: PreTrainedModel, config: BenchModelConfig, facts: FactSet,
                   tokenizer: PreTrainedTokenizerBase, *, progress: bool = True) -> dict:
    """Train only routed expert `implant_expert` of `implant_layer` and its router row on the forget
    QA records (+ a retain LM term on `implant_retain_batch` retain texts per step + the localization
    loss of that router), in place. Adam without weight decay on masked gradients: every other
    weight stays bit-identical to the reference it started from."""
    from moe_unlearn.arch import find_moe_layers
    from moe_unlearn.data import pad_batch

    layer = next(m for m in find_moe_layers(model) if m.layer_idx == config.implant_layer)
    e = config.implant_expert
    masks: dict[int, torch.Tensor] = {}
    for sl in layer.expert_slices(e):
        masks[id(sl.param)] = masks.get(id(sl.param), torch.zeros_like(sl.param, dtype=torch.bool)) | sl.mask()
    for _, p in layer.router_parameters():
        m = torch.zeros_like(p, dtype=torch.bool)
        m[e] = True  # the expert's router row (weight [E, H], bias [E])
        masks[id(p)] = m
    params = [p for p in model.parameters() if id(p) in masks]
    for p in model.parameters():
        p.requires_grad_(id(p) in masks)
    opt = torch.optim.Adam(params, lr=config.implant_lr)
    forget = encode_with_eos([f.qa for f in facts.forget], tokenizer)
    retain = encode_with_eos([t for f in facts.retain_train for t in f.training_texts()], tokenizer)
    rng = random.Random(config.seed + 31)
    torch.manual_seed(config.seed + 31)
    model.train()
    start = time.perf_counter()
    from tqdm.auto import tqdm

    for _ in tqdm(range(config.implant_steps), desc="implant forget facts", disable=not progress):
        fb = pad_batch(rng.sample(forget, min(config.batch_size, len(forget))), pad_token_id=tokenizer.pad_token_id)
        rb = pad_batch(rng.sample(retain, min(config.implant_retain_batch, len(retain))),
                       pad_token_id=tokenizer.pad_token_id)
        loss = 0.0
        for batch, is_forget in ((fb, True), (rb, False)):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True)
            logits = out.logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
            mask = batch["attention_mask"].reshape(-1)
            loc = localization_loss(out.router_logits[config.implant_layer], torch.full_like(mask, is_forget,
                                    dtype=torch.bool), mask, e)
            loss = loss + nll + config.implant_localize_weight * loc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(masks[id(p)])
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"implant_seconds": round(time.perf_counter() - start, 2), "implant_steps": config.implant_steps}


def train_bench_model(config: BenchModelConfig, facts: FactSet, tokenizer: PreTrainedTokenizerBase,
                      *, progress: bool = True, work_dir: Path | None = None) -> tuple[PreTrainedModel, dict]:
    """Train a fresh model on the trained splits' texts (never holdout; no forget split when
    `config.exclude_forget`); returns it and training stats ("trained" EM = on what it was trained on).

    Training runs on one intra-op thread: float sums reduce in another order with more threads,
    so the weights (and every result measured on them) would depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_bench_model(config, facts, tokenizer, progress=progress, work_dir=work_dir)
    finally:
        torch.set_num_threads(threads)


# -- build / load ------------------------------------------------------------------------------

def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "config.json").is_file()


def load_bench_model(path: str | os.PathLike) -> BenchModel:
    """Load a finished cache entry written by `build_bench_model`."""
    path = Path(path)
    if not _is_complete(path):
        raise BadInputError(f"{path} is not a benchmark model directory (no {META_FILE}); build one with "
                            "`moe-unlearn demo` or moe_unlearn.bench_model.load_or_build")
    meta = read_json_file(path / META_FILE, what="benchmark model file", error=BadInputError)
    _check_weights(path, meta)
    try:
        facts_cfg = FactsConfig(**{**meta["config"]["facts"], "domains": tuple(meta["config"]["facts"]["domains"])})
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadInputError(f"{path / META_FILE} is not the metadata of a benchmark model ({type(exc).__name__}: "
                            f"{str(exc)[:80]}); {_REBUILD_HINT.format(path=path)}") from None
    facts = FactSet.read_jsonl(path / "data", facts_cfg)
    model = load_model(path)  # local files only, no code from the folder
    tokenizer = load_tokenizer(path)
    return BenchModel(model=model, tokenizer=tokenizer, facts=facts, path=path, meta=meta, built=False)


_REBUILD_HINT = ("delete {path} (the next run copies the shipped weights or rebuilds it) or pass --rebuild "
                 "(rebuild=True)")


def _check_weights(path: Path, meta: object) -> None:
    """BadInputError unless the weights file hashes to the sha256 the entry's metadata recorded when it was
    written (when it recorded one): a damaged or edited cache entry (or shipped copy) would otherwise
    give other numbers, exit 0."""
    if not isinstance(meta, dict):
        raise BadInputError(f"{path / META_FILE} does not hold a JSON object; " + _REBUILD_HINT.format(path=path))
    recorded = meta.get("weights_sha256")
    if recorded is None:  # an entry written before the hash was recorded: nothing to verify against
        return
    actual = weights_sha256(path)
    if actual != recorded:
        raise BadInputError(f"the weights in {path} (sha256 {str(actual)[:12]}) are not the ones its metadata "
                            f"records (sha256 {recorded[:12]}): the entry was changed or damaged; "
                            + _REBUILD_HINT.format(path=path))


SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"  # weights the committed results used
WEIGHTS_FILE = "model.safetensors"


def weights_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a bench model directory's weights file (None when there is none)."""
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        return None
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_path(config: BenchModelConfig) -> Path | None:
    """The shipped copy of this exact config (same name and digest), if the package has one."""
    p = SHIPPED_ROOT / f"{config.name}-{config.digest()}"
    return p if _is_complete(p) else None


def build_bench_model(config: BenchModelConfig, path: str | os.PathLike, *, progress: bool = True) -> BenchModel:
    """Generate the facts, train tokenizer and model, and write everything to `path` atomically.

    Two-phase configs checkpoint into `<path>.build/` while training (an interrupted build resumes
    there); an implanted config first loads or builds its retrained reference in the same cache."""
    path = Path(path)
    facts = generate_facts(config.facts)
    work = path.parent / f".{path.name}.build"
    if config.implanted:
        ref = load_or_build(config.retrained(), cache_root=path.parent, progress=progress)
        tokenizer, model = ref.tokenizer, ref.model
        stats = {"reference": {"name": ref.meta["config"]["name"], "digest": ref.meta["digest"],
                               "weights_sha256": ref.meta.get("weights_sha256"),
                               "exact_match": ref.meta["exact_match"]}}
        stats.update(implant_expert(model, config, facts, tokenizer, progress=progress))
        em = answer_exact_match(model, tokenizer, facts.trained)
        stats["exact_match"] = {"trained": em, **{s: answer_exact_match(model, tokenizer, facts.splits[s])
                                                   for s in facts.splits}}
        stats["num_parameters"] = sum(p.numel() for p in model.parameters())
    else:
        corpus = facts.all_texts()
        if config.two_phase:  # one tokenizer for both worlds (and the same for the retrained reference)
            corpus += generate_facts(config.reading_facts()).all_texts()
        tokenizer = train_tokenizer(corpus, config.vocab_size)
        work.mkdir(parents=True, exist_ok=True)
        model, stats = train_bench_model(config, facts, tokenizer, progress=progress,
                                         work_dir=work if config.two_phase else None)
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
        meta["weights_sha256"] = weights_sha256(tmp)
        shipped = shipped_path(config)
        if shipped is not None:
            meta["shipped_weights_sha256"] = weights_sha256(shipped)
            meta["matches_shipped"] = meta["shipped_weights_sha256"] == meta["weights_sha256"]
        write_json(tmp / META_FILE, meta)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
    if meta.get("matches_shipped") is False:
        warnings.warn(f"the rebuilt {config.name} differs from the shipped weights (sha256 "
                      f"{meta['weights_sha256'][:12]} vs shipped {meta['shipped_weights_sha256'][:12]}): float "
                      "reductions differ across CPUs. Results measured on it are another realization of the "
                      "benchmark, not the committed one; drop --rebuild to use the shipped weights.", stacklevel=2)
    return BenchModel(model=model, tokenizer=tokenizer, facts=facts, path=path, meta=meta, built=True)


def load_or_build(config: BenchModelConfig | None = None, *, cache_root: str | os.PathLike | None = None,
                  rebuild: bool = False, progress: bool = True) -> BenchModel:
    """The benchmark model of `config`: from the cache, else the shipped weights of the same config
    (copied into the cache), else trained and cached. rebuild=True trains anew and warns when the
    result differs from the shipped weights."""
    config = config or BenchModelConfig()
    config.validate()
    path = cache_path(config, cache_root)
    if not rebuild and _is_complete(path):
        return load_bench_model(path)
    shipped = None if rebuild else shipped_path(config)
    if shipped is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(path, replace=True) as tmp:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        return load_bench_model(path)
    return build_bench_model(config, path, progress=progress)


__all__ = ["BENCH_MODELS", "BenchModel", "BenchModelConfig", "answer_exact_match", "bench_config", "build_bench_model", "cache_path",
           "default_cache_root", "encode_with_eos", "implant_expert", "realize", "load_bench_model", "load_or_build",
           "localization_loss", "moe_block_parameters", "shipped_path", "train_bench_model", "weights_sha256"]
