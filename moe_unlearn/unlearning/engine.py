"""`unlearn()`: one function from (model, forget data) to an unlearning patch.

    result = unlearn(model, forget_texts, retain_texts, tokenizer=tok, method="npo", scope="uoe",
                     out_dir="patches/req-001")
    revert_patch(model, result.patch_path)    # the model is back to the original, bit-exactly

The run's knobs are one `UnlearnConfig` (moe_unlearn.unlearning.config); keyword arguments of
`unlearn()` build it. The path, top to bottom, one function per phase:
  _inputs      checks, load and tokenize the data, choose targets (given, or from an
               attribution), resolve the scope into trained tensors / expert slices;
  _references  values of the original model, once (what the objective declares it needs);
  _loss        the loss of one step (objective + router anchor + retain-routing KL);
  _train       the shared loop (moe_unlearn.training) over fp32 masters of the trained weights;
  _outputs     the patch (or a merged model), written by rank 0 under torch.distributed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch import MoELayer, RoutingCapture, find_moe_layers
from moe_unlearn.arch.base import ExpertSlice
from moe_unlearn.arch.discovery import adapter_for, decoder_layers
from moe_unlearn.arch.stack import DecoderStack
from moe_unlearn.arch.wrappers import canonical_parameters, is_peft_layer, unwrap_model
from moe_unlearn.atomic import atomic_dir, check_out_dir
from moe_unlearn.distributed import GradAllReduce, RankShard, barrier, check_not_sharded
from moe_unlearn.distributed import world as dist_world
from moe_unlearn.errors import BadInputError, DataError, NotAnMoEModel, TrainingDiverged
from moe_unlearn.loading import input_device
from moe_unlearn.training import TrainConfig, TrainHistory, TrainHooks, train
from moe_unlearn.unlearning.anchor import anchor_target, retain_routing_kl, router_anchor_loss
from moe_unlearn.unlearning.checkpointing import checkpointed
from moe_unlearn.unlearning.checks import check_unlearn_config, checkpoint_dir_for
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.objectives import (
    Objective,
    ObjectiveInputs,
    get_objective,
    rmu_steering,
    sequence_nll,
)
from moe_unlearn.unlearning.patch import PatchEntry, config_hash, snapshot, write_patch
from moe_unlearn.unlearning.prefix_cache import PrefixCache
from moe_unlearn.unlearning.scopes import ExpertTarget, ScopePlan, SliceParams, resolve_scope
from moe_unlearn.validate import check_token_ids

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class UnlearnResult:
    """What a run produced. patch_path: the patch directory (None with merge or without out_dir)."""

    patch_path: Path | None
    merged_path: Path | None
    method: str
    scope: str
    targets: list[str]
    history: TrainHistory
    trainable_params: int
    optimizer_state_bytes: int
    wall_time: float
    final_terms: dict[str, float] = field(default_factory=dict)
    prefix_cache_start: int | None = None  # first layer run per step (None = whole model)
    details: dict[str, Any] = field(default_factory=dict)  # projection ranks / energies, TRACE weights


# -- inputs ------------------------------------------------------------------------------------


def _batches(source: Any, tokenizer: Any, *, batch_size: int, max_length: int, field_name: str | None,
             what: str, loss_tokens: str, seed: int, model: nn.Module | None = None, template: str | None = None):
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


def _batches_hash(batches: list[dict[str, torch.Tensor]]) -> str:
    """sha256 of the token ids and labels of every batch (which data a checkpoint was trained on)."""
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            t = b[key].detach().cpu().contiguous()
            h.update(f"{key}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _parse_targets(target: Any, scope: str, *, model: nn.Module, forget_source: Any, tokenizer: Any,
                   top_m: int, topm_layer: int | None, batch_size: int, max_length: int, progress: bool,
                   coverage: float | None = None, retain_source: Any = None) -> list[ExpertTarget]:
    if scope not in ("uoe", "topm"):
        return []
    from moe_unlearn.attribution import Attribution, attribute_experts, select_targets

    if target is None:
        target = attribute_experts(model, forget_source, tokenizer=tokenizer, batch_size=batch_size,
                                   max_length=max_length, progress=progress, retain=retain_source)
    if coverage is not None:
        if not isinstance(target, Attribution):
            raise BadInputError("coverage=... chooses the targets from an attribution; give target=None (attribute "
                                "now) or an Attribution, not explicit experts")
        return [ExpertTarget(lay, e) for lay, e in select_targets(target, coverage=coverage)]
    if isinstance(target, Attribution):
        target.check_model(model)  # an attribution of another model names the wrong experts
        m = 1 if scope == "uoe" else top_m
        entries = target.ranking(layer=topm_layer)[:m] if topm_layer is not None else target.top(m)
        if len(entries) < m:
            raise BadInputError(f"top_m={m} but the attribution has only {len(entries)} candidate experts"
                                f"{'' if topm_layer is None else f' in layer {topm_layer}'}; lower top_m")
        if target.token_topk is not None or (len(entries) == 1 and target.retain_frequency is not None):
            target.premise([(e.layer, e.expert) for e in entries])  # PremiseWarning when UOE's premise fails
        return [ExpertTarget(e.layer, e.expert) for e in entries]
    single = isinstance(target, (str, ExpertTarget)) or hasattr(target, "layer") or (
        isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], int))
    return [ExpertTarget.coerce(t) for t in ([target] if single else list(target))]


class _ForgetRetainPairs:
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


def _model_dir(model: nn.Module, model_dir: str | os.PathLike | None) -> Path | None:
    cand = model_dir or getattr(getattr(model, "config", None), "_name_or_path", None)
    if cand and Path(cand).is_dir():
        return Path(cand).resolve()
    return None


# -- running the model -------------------------------------------------------------------------


class _Runner:
    """Forward passes for one step: the whole model, or (prefix caching) layers from `start` up.

    Returns logits (None when not needed) and the output of decoder layer `hidden_layer` (RMU)."""

    def __init__(self, model: nn.Module, *, start: int | None, cache_bytes: int, cache: bool,
                 hidden_layer: int | None, need_logits: bool) -> None:
        self.model = model
        self.hidden_layer = hidden_layer
        self.need_logits = need_logits
        self.stack = None
        if start is not None:
            try:
                self.stack = DecoderStack(model)
            except NotAnMoEModel:  # a layout the stack runner does not know: run the whole model
                start = None
        self.cache = PrefixCache(self.stack, start, max_bytes=cache_bytes, enabled=cache) if self.stack else None
        self.start = start

    def __call__(self, key: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None,
                                                                          torch.Tensor | None]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.stack is not None:
            inp = self.stack.inputs(ids, mask)
            h = self.cache.get(key, ids, mask)
            hidden = None
            if self.hidden_layer is not None:
                h = self.stack.run(h, inp, start=self.start, stop=self.hidden_layer + 1)
                hidden = h
                if not self.need_logits:
                    return None, hidden
                h = self.stack.run(h, inp, start=self.hidden_layer + 1)
            else:
                h = self.stack.run(h, inp, start=self.start)
            return self.stack.logits(h), hidden
        grabbed: dict[str, torch.Tensor] = {}
        handle = None
        if self.hidden_layer is not None:
            layer = _layer_list(self.model)[self.hidden_layer]
            handle = layer.register_forward_hook(
                lambda m, a, o: grabbed.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            if handle is not None:
                handle.remove()
        return logits, grabbed.get("h")


@contextlib.contextmanager
def _original_weights(model: nn.Module, entries: list[PatchEntry], originals: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily put the original values back into the trained tensors (reference forward passes
    without a copy of the model)."""
    params = canonical_parameters(model)
    saved = []
    with torch.no_grad():
        for e, orig in zip(entries, originals, strict=True):
            view = e.view(params)
            saved.append((view, view.clone()))
            view.copy_(orig.to(view.device))
    try:
        yield
    finally:
        with torch.no_grad():
            for view, cur in saved:
                view.copy_(cur)


def _layer_list(model: nn.Module) -> nn.ModuleList:
    return decoder_layers(model, adapter_for(model).decoder_layer_lists)[1]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _align_forget(inp: ObjectiveInputs) -> None:
    """device_map: move labels, mask and references to where the outputs they meet came out
    (logits on the lm_head's device, RMU hidden states on that layer's device); a no-op on one device."""
    out = inp.forget_logits if inp.forget_logits is not None else inp.forget_hidden
    if out is None:
        return
    inp.forget_labels, inp.forget_mask = inp.forget_labels.to(out.device), inp.forget_mask.to(out.device)
    if inp.forget_ref_logp is not None:
        inp.forget_ref_logp = inp.forget_ref_logp.to(out.device)
    if inp.forget_ref_logits is not None:
        inp.forget_ref_logits = inp.forget_ref_logits.to(out.device)
    if inp.steering is not None and inp.forget_hidden is not None:
        inp.steering = inp.steering.to(inp.forget_hidden.device)


def _align_retain(inp: ObjectiveInputs) -> None:
    out = inp.retain_logits if inp.retain_logits is not None else inp.retain_hidden
    if out is None:
        return
    inp.retain_labels, inp.retain_mask = inp.retain_labels.to(out.device), inp.retain_mask.to(out.device)
    if inp.retain_ref_logits is not None:
        inp.retain_ref_logits = inp.retain_ref_logits.to(out.device)


def _entries(plan: ScopePlan) -> list[PatchEntry]:
    return [PatchEntry(n) for n, _ in plan.whole] + [PatchEntry(s.name, s.dim, s.start, s.stop)
                                                    for s in plan.slices]


def _trained_layers(plan: ScopePlan) -> list[int] | None:
    """Decoder-layer indices of every trained weight; None if anything outside the layers trains."""
    found = []
    for name in [n for n, _ in plan.whole] + [s.name for s in plan.slices]:
        m = _LAYER_RE.search(name)
        if m is None:
            return None
        found.append(int(m.group(1)))
    return found


def _last_trained_layer(plan: ScopePlan) -> int | None:
    """Highest decoder layer holding trained weights; None if anything outside the layers trains."""
    found = _trained_layers(plan)
    return max(found) if found else None


def _prefix_start(plan: ScopePlan) -> int | None:
    """First decoder layer holding trained weights, or None if anything outside the layers trains."""
    found = _trained_layers(plan)
    return min(found) if found else None


# -- the API -----------------------------------------------------------------------------------


def unlearn(model: nn.Module, forget: Any, retain: Any = None, *, tokenizer: Any = None,
            config: UnlearnConfig | None = None, callbacks: list[TrainHooks] | None = None,
            **options: Any) -> UnlearnResult:
    """Unlearn `forget` from `model` IN PLACE and write a patch that undoes / redoes it.

    The run's knobs are an `UnlearnConfig` (`config=`), or keyword arguments naming its fields
    (they override `config`'s values): `unlearn(model, f, r, tokenizer=tok, lr=1e-5)`.
    forget / retain: anything `moe_unlearn.data.load_texts` reads (list of strings, .txt,
      .jsonl, dataset dir) or `TokenizedBatches`. retain is optional except for graddiff.
    method: a name in `objectives.OBJECTIVES` (ga, graddiff, npo, simnpo, rmu, eul); method_kwargs
      override its hyperparameters (e.g. {"beta": 0.1, "retain_loss": "kl"}). "ablate" (uoe/topm)
      trains nothing: the targets' down projections are zeroed, as a patch.
    coverage (topm): choose the targets with `select_targets(attribution, coverage)`: experts added
      greedily (forget mass x selectivity) until they cover that share of the forget tokens.
    scope: full | experts | routers | uoe | topm. target (uoe/topm): "L:E", (L, E), a list of
      those, "L:shared" (needs allow_shared=True), or an `Attribution`; None = attribute the
      forget set now. topm takes the top `top_m` experts (of `topm_layer` if given).
    anchor_weight: SEUF router anchor on the target layers (uoe / topm; 0 turns it off).
    retain_routing_weight: KL(original || current) routing on retain tokens at every layer whose
      router trains.
    prefix_cache: with all trained weights in layers >= l, run only layers >= l each step and
      cache the states entering l (bounded by prefix_cache_mb; beyond it they are recomputed).
    gradient_checkpointing: recompute the activations of the decoder layers above every trained
      weight in backward instead of keeping them (less memory, one more forward of those layers).
    loss_tokens: "answer" (default): question/answer records score their answer tokens only (the
      prompt gets label -100, as open-unlearning does for TOFU and as the evaluation scores QA);
      plain texts score every token. "all": every token of every text.
    seed: orders the forget and retain texts into batches, the forget batches per epoch and
      the forget/retain pairing (the same seed reproduces a run bit-exactly).
    callbacks: extra `TrainHooks` (e.g. evaluate the model every N steps); they run after the
      engine's own hooks, so after_step sees the updated weights in the model.
    router_projection="grip": after every step the trained routers' change is projected off the
      span of their retain inputs (energy `projection_energy`), so retain routing stays put.
    expert_projection="retain_null" (uoe / topm): the trained experts' changes are projected off
      the span of the retain inputs routed to them (gate/up) and of those tokens' intermediate
      activations (down), so retain tokens routed through a target keep its output
      (see moe_unlearn.unlearning.projection).
    retain_weighting="trace": the retain loss weights each token by how much its experts are
      forget-critical (see moe_unlearn.unlearning.trace). All three need retain data.
    adapter="lora" (uoe / topm / experts): each expert matrix trains as W0 + B A of rank
      `adapter_rank` (the router too with adapter_router=True); the patch stores the factors and
      the Gram statistics of each matrix's inputs (`adapter_gram_rank` eigendirections, 0 = none)
      that `fuse_patches` merges requests with (see moe_unlearn.unlearning.adapters / .fusion).
    out_dir: new (or empty) directory for the patch (or, with merge=True, the merged model);
      None writes nothing. The model's own directory is refused.
    Under torch.distributed (torchrun) the data is split over the ranks and the trained slices'
    gradients are averaged (moe_unlearn.distributed); only rank 0 writes.
    The model is left in its original train/eval mode with the unlearned weights in place; on a
    NaN/inf loss the original weights are restored, TrainingDiverged is raised and nothing is written.

    The phases, in order: `_inputs` (checks, data, targets, scope) -> `_references` (values of
    the original model, once) -> `_loss` (the per-step loss) -> `_train` (the shared loop) ->
    `_outputs` (patch or merged model).
    """
    t0 = time.perf_counter()
    cfg = UnlearnConfig.build(config, **options)
    if cfg.method == "ablate" and cfg.adapter is not None:
        raise BadInputError("method 'ablate' trains nothing; it takes no adapter")
    if cfg.method == "ablate":  # no training: the targets' down projections zeroed (moe_unlearn.unlearning.ablate)
        from moe_unlearn.unlearning.ablate import ablate

        return ablate(model, forget, retain, tokenizer=tokenizer, scope=cfg.scope, target=cfg.target, top_m=cfg.top_m,
                      topm_layer=cfg.topm_layer, coverage=cfg.coverage, batch_size=cfg.batch_size,
                      max_length=cfg.max_length, progress=cfg.progress, out_dir=cfg.out_dir, merge=cfg.merge,
                      model_dir=cfg.model_dir)
    run = _inputs(model, forget, retain, tokenizer, cfg)
    ref = _references(run)
    loss_fn = _loss(run, ref)
    history = _train(run, loss_fn, callbacks)
    return _outputs(run, history, forget, retain, t0)


@dataclass
class _Run:
    """What the phases share: the checked inputs and everything derived from them once."""

    cfg: UnlearnConfig
    model: nn.Module
    objective: Objective
    hp: dict[str, Any]
    out_path: Path | None
    forget_batches: list[dict[str, torch.Tensor]]
    retain_batches: list[dict[str, torch.Tensor]] | None
    layers: list[MoELayer]
    by_idx: dict[int, MoELayer]
    targets: list[ExpertTarget]
    plan: ScopePlan
    device: torch.device
    runner: _Runner
    ref_runner: _Runner
    hidden_layer: int | None  # the layer whose output the objective reads (RMU), else None
    anchor_layers: dict[int, list[int]]
    rr_layers: list[int]
    capture_layers: list[MoELayer]
    retain_ref_kind: str | None
    rank: int = 0
    world_size: int = 1
    # set by _references: the trained entries, their original values, the model's mode and flags
    entries: list[PatchEntry] = field(default_factory=list)
    originals: list[torch.Tensor] = field(default_factory=list)
    was_training: bool = False
    requires_grad: dict[str, bool] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # projection ranks / energies, TRACE weights
    slice_owner: dict[tuple, tuple[int, int]] = field(default_factory=dict)  # slice key -> (layer, expert)
    grams: dict[int, dict[str, Any]] = field(default_factory=dict)  # entry index -> input Gram factors (adapters)
    # set by _train
    ckpt_dir: Path | None = None
    ckpt_existed: bool = False
    trained: Any = None  # the SliceParams / AdapterParams that trained


# -- phase 1: inputs ---------------------------------------------------------------------------


def _inputs(model: nn.Module, forget: Any, retain: Any, tokenizer: Any, cfg: UnlearnConfig) -> _Run:
    """Every check that can fail, the data, the targets and the scope, before any weight changes."""
    model = unwrap_model(model)  # DDP / FSDP1 / DeepSpeed / PEFT wrappers: train the model inside
    check_not_sharded(model)  # FSDP2 / ZeRO-3 shards: one clear error before any work
    rank, world_size = dist_world()
    cfg.progress = cfg.progress and rank == 0
    objective = get_objective(cfg.method)
    mdir = _model_dir(model, cfg.model_dir)
    # everything that needs no forward pass, before any work (the CLI runs it before it loads the model)
    hp = check_unlearn_config(cfg, has_retain=retain is not None, model_dir=mdir)
    out_path = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if cfg.merge and out_path is not None and any(is_peft_layer(m) for m in model.modules()):
        raise BadInputError("merge=True on a PEFT-wrapped model would save PEFT's layers inside the model; write "
                            "a patch instead (it applies to the stock model), or merge_and_unload() the PEFT "
                            "adapter first")

    data_kw = dict(batch_size=cfg.batch_size, max_length=cfg.max_length, field_name=cfg.field,
                   loss_tokens=cfg.loss_tokens, model=model,  # model: token ids past its embedding are refused
                   template=cfg.template)
    forget_batches = _batches(forget, tokenizer, what="forget", seed=cfg.seed, **data_kw)
    retain_batches = (_batches(retain, tokenizer, what="retain", seed=cfg.seed + 1, **data_kw)
                      if retain is not None else None)
    layers = find_moe_layers(model)
    targets = _parse_targets(cfg.target, cfg.scope, model=model, forget_source=forget, tokenizer=tokenizer,
                             top_m=cfg.top_m, topm_layer=cfg.topm_layer, batch_size=cfg.batch_size,
                             max_length=cfg.max_length, progress=cfg.progress, coverage=cfg.coverage,
                             retain_source=retain)
    plan = resolve_scope(model, layers, cfg.scope, targets, allow_shared=cfg.allow_shared)
    slice_owner = _slice_owners(layers, plan, adapter_experts=cfg.adapter is not None and cfg.scope == "experts")
    if out_path is not None:  # now that the size is known: room for the patch (new + old values) or the model
        need = (sum(p.numel() * p.element_size() for p in model.parameters()) if cfg.merge
                else 2 * sum(p.element_size() * p.numel() for _, p in plan.whole)
                + 2 * sum(s.numel * s.param.element_size() for s in plan.slices))
        check_out_dir(out_path, model_dirs=(mdir,), must_be_empty=True, what="out_dir", need_bytes=need)
    by_idx: dict[int, MoELayer] = {layer.layer_idx: layer for layer in layers}
    if cfg.router_projection is not None and not plan.router_layers:
        raise BadInputError(f"router_projection={cfg.router_projection!r}: scope {cfg.scope!r} trains no router")

    # which layers the step must run, and which hidden state the objective reads
    start = _prefix_start(plan) if cfg.prefix_cache else None
    hidden_layer = _hidden_layer(objective, hp, model, plan, targets)
    runner = _Runner(model, start=start, cache_bytes=int(cfg.prefix_cache_mb * 2**20), cache=cfg.prefix_cache,
                     hidden_layer=hidden_layer, need_logits=objective.needs_logits)
    ref_runner = _Runner(model, start=None, cache_bytes=0, cache=False, hidden_layer=hidden_layer,
                         need_logits=True)

    anchor_layers: dict[int, list[int]] = {}
    if cfg.scope in ("uoe", "topm") and cfg.anchor_weight:
        for t in targets:
            if not t.shared:
                anchor_layers.setdefault(t.layer, []).append(int(t.expert))
    rr_layers = plan.router_layers if cfg.retain_routing_weight else []
    return _Run(cfg=cfg, model=model, objective=objective, hp=hp, out_path=out_path, forget_batches=forget_batches,
                retain_batches=retain_batches, layers=layers, by_idx=by_idx, targets=targets, plan=plan,
                device=input_device(model),  # the first device of a device_map model
                runner=runner, ref_runner=ref_runner, hidden_layer=hidden_layer, anchor_layers=anchor_layers,
                rr_layers=rr_layers,
                capture_layers=[by_idx[i] for i in sorted(set(anchor_layers) | set(rr_layers))],
                retain_ref_kind=objective.retain_reference(hp) if retain_batches is not None else None,
                rank=rank, world_size=world_size, slice_owner=slice_owner)


def _slice_owners(layers: list[MoELayer], plan: ScopePlan, *, adapter_experts: bool) -> dict[tuple, tuple[int, int]]:
    """(layer, expert) of every trained expert slice. With an adapter on scope "experts", the fused
    expert tensors are first split into per-expert slices (one low-rank delta per expert matrix)."""
    owner: dict[tuple, tuple[int, int]] = {}
    for layer in layers:
        for e in range(layer.num_experts):
            for sl in layer.expert_slices(e):
                owner[(sl.name, sl.dim, sl.start, sl.stop)] = (layer.layer_idx, e)
                if adapter_experts:
                    plan.slices.append(sl)
    if adapter_experts:
        covered = {sl.name for sl in plan.slices}
        plan.whole = [(n, p) for n, p in plan.whole if n not in covered]
    keys = {(sl.name, sl.dim, sl.start, sl.stop) for sl in plan.slices}
    return {k: v for k, v in owner.items() if k in keys}


def _hidden_layer(objective: Objective, hp: dict[str, Any], model: nn.Module, plan: ScopePlan,
                  targets: list[ExpertTarget]) -> int | None:
    """The decoder layer whose output a representation objective (RMU) reads: hp["layer"], else
    the highest target layer, else the middle layer; it must be at or above the trained layers."""
    if not objective.reads_hidden:
        return None
    num_layers = len(_layer_list(model))
    layer = hp["layer"]
    if layer is None:
        trained = {t.layer for t in targets} or None
        layer = max(trained) if trained else num_layers // 2
    if not 0 <= layer < num_layers:
        raise BadInputError(f"{objective.name} layer {layer} out of range (0..{num_layers - 1})")
    first = _prefix_start(plan)
    if first is not None and layer < first:
        raise BadInputError(f"{objective.name} layer {layer} is below every trained layer (first: {first}); its "
                            "output cannot change. Choose layer >= the target layer")
    return layer


# -- phase 2: references -----------------------------------------------------------------------


def _references(run: _Run) -> dict[str, Any]:
    """Values of the original model, computed once before any step (what the objective declares
    it needs: forget log-probs, retain hidden states; retain routing for the routing KL); also
    snapshots the trained weights and puts the model in eval mode (no dropout, so reference
    values line up with the trained passes)."""
    model, objective = run.model, run.objective
    run.entries = _entries(run.plan)
    run.originals = snapshot(model, run.entries)
    run.was_training = model.training
    run.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    ref: dict[str, Any] = {"f_logp": {}, "r_hidden": {}, "r_scores": {}, "steering": None}
    model.eval()
    with torch.no_grad():
        if objective.forget_reference == "logp":
            for k, b in enumerate(run.forget_batches):
                b = _to(b, run.device)
                logits, _ = run.ref_runner(("f", k), b)
                ref["f_logp"][k] = -sequence_nll(logits, b["labels"].to(logits.device))[0]
        if run.retain_batches is not None and (run.retain_ref_kind == "hidden" or run.rr_layers):
            for k, b in enumerate(run.retain_batches):
                b = _to(b, run.device)
                with RoutingCapture(model, [run.by_idx[i] for i in run.rr_layers]) as cap:
                    _, hidden = run.ref_runner(("r", k), b)
                if run.retain_ref_kind == "hidden":
                    ref["r_hidden"][k] = hidden
                if run.rr_layers:
                    ref["r_scores"][k] = {i: run.by_idx[i].scores_from_logits(cap.records[-1].layers[i].logits)
                                          for i in run.rr_layers}
    if run.cfg.adapter is not None and run.cfg.adapter_gram_rank > 0:  # 0: a smaller patch that cannot be fused
        run.grams = _adapter_grams(run)
    ref["trace_w"] = None
    if run.cfg.retain_weighting == "trace":  # retain token weights by how forget-critical their experts are
        from moe_unlearn.unlearning.trace import trace_weights

        critical = None
        if run.targets:
            critical = {}
            for t in run.targets:
                if not t.shared:
                    critical.setdefault(t.layer, []).append(int(t.expert))
        trace_layers = [run.by_idx[i] for i in sorted(critical)] if critical is not None else run.layers
        ref["trace_w"], run.details["trace"] = trace_weights(model, run.forget_batches, run.retain_batches,
                                                             trace_layers, critical, run.device)
    if objective.reads_hidden:  # the representation target of RMU: a fixed random direction
        ref["steering"] = rmu_steering(model.config.hidden_size, run.hp["steering_coeff"], seed=run.cfg.seed,
                                       device=run.device)
    return ref


def _slice_key(x: Any) -> tuple:
    return (x.name, x.dim, x.start, x.stop)


def _gram_key(run: _Run, entry: PatchEntry, slices: dict[tuple, ExpertSlice]) -> str | None:
    """Which input Gram an entry's matrix reads (see moe_unlearn.unlearning.projection.input_grams)."""
    if entry.dim is not None:
        owner = run.slice_owner.get(_slice_key(entry))
        sl = slices.get(_slice_key(entry))
        if owner is None or sl is None or sl.role not in ("gate_up", "gate", "up", "down"):
            return None
        return f"{'a' if sl.role == 'down' else 'x'}/{owner[0]}/{owner[1]}"
    for i in run.plan.router_layers:
        for n, p in run.by_idx[i].router_parameters():
            if n == entry.name and p.dim() == 2:
                return f"router/{i}"
    return None


def _adapter_grams(run: _Run) -> dict[int, dict[str, Any]]:
    """Per trained matrix, factors of the Gram matrices of its inputs on the forget and the retain
    data (original model), stored with an adapter patch so that fuse_patches needs no data."""
    from moe_unlearn.unlearning.adapters import gram_factor
    from moe_unlearn.unlearning.projection import input_grams

    slices = {_slice_key(sl): sl for sl in run.plan.slices}
    keys = {i: _gram_key(run, e, slices) for i, e in enumerate(run.entries)}
    keys = {i: k for i, k in keys.items() if k is not None}
    experts = sorted({tuple(int(x) for x in k.split("/")[1:]) for k in keys.values() if not k.startswith("router")})
    routers = sorted({int(k.split("/")[1]) for k in keys.values() if k.startswith("router")})
    kw = dict(router_layers=[run.by_idx[i] for i in routers], experts=[(run.by_idx[i], e) for i, e in experts],
              device=run.device)
    stats = {"forget": input_grams(run.model, run.forget_batches, **kw),
             "retain": input_grams(run.model, run.retain_batches or [], **kw)}
    params = canonical_parameters(run.model)
    out = {}
    for i, key in keys.items():
        e = run.entries[i]
        in_features = _in_features(run, e, params, slices)
        rec: dict[str, Any] = {}
        for kind, g in stats.items():
            gram = g.sums.get(key, torch.zeros(in_features, in_features, dtype=torch.float64))
            rec[kind], rec[f"{kind}_energy"] = gram_factor(gram, run.cfg.adapter_gram_rank)
            rec[f"{kind}_tokens"] = g.counts.get(key, 0)
        out[i] = rec
    return out


def _in_features(run: _Run, entry: PatchEntry, params: dict[str, nn.Parameter],
                 slices: dict[tuple, ExpertSlice]) -> int:
    from moe_unlearn.unlearning.adapters import router_layout, slice_layout

    if entry.dim is None:
        return router_layout(params[entry.name], run.model.config.hidden_size).matrix(params[entry.name]).shape[1]
    sl = slices[_slice_key(entry)]
    layer, expert = run.slice_owner[_slice_key(sl)]
    return slice_layout(run.by_idx[layer], sl, expert).matrix(sl.view()).shape[1]


def _trained_params(run: _Run):
    """What the optimizer trains: SliceParams (shadows of the slices, masters of whole tensors), or
    with an adapter AdapterParams (factors of every expert matrix, and of the routers with
    adapter_router; the rest in full)."""
    cfg, plan = run.cfg, run.plan
    if cfg.adapter is None:
        return SliceParams(plan.slices, plan.whole)
    from moe_unlearn.unlearning.adapters import AdapterParams, router_layout, slice_layout

    matrices, rest_slices, rest_whole = [], [], []
    for sl in plan.slices:
        layer, expert = run.slice_owner[_slice_key(sl)]
        layout = slice_layout(run.by_idx[layer], sl, expert)
        if layout is None:
            rest_slices.append(sl)
        else:
            matrices.append((sl.name, sl.param, sl.dim, sl.start, sl.stop, layout))
    router_names = {n for i in plan.router_layers for n, _ in run.by_idx[i].router_parameters()}
    hidden = run.model.config.hidden_size
    for n, p in plan.whole:
        layout = router_layout(p, hidden) if cfg.adapter_router and n in router_names else None
        if layout is None:
            rest_whole.append((n, p))
        else:
            matrices.append((n, p, None, None, None, layout))
    return AdapterParams(matrices, rest_slices, rest_whole, rank=cfg.adapter_rank, seed=cfg.seed)


# -- phase 3: the loss of one step ---------------------------------------------------------------


def _loss(run: _Run, ref: dict[str, Any]):
    """loss_fn(item) for the training loop: the objective on one forget batch (and its paired
    retain batch), plus the router anchor and the retain-routing KL where they are on."""
    model, objective, hp, cfg, device = run.model, run.objective, run.hp, run.cfg, run.device
    by_idx, runner = run.by_idx, run.runner
    need_retain_pass = run.retain_batches is not None and (objective.uses_retain(hp) or bool(run.rr_layers))

    def routed(cap: RoutingCapture, layer_idx: int) -> torch.Tensor:
        return by_idx[layer_idx].scores_from_logits(cap.records[-1].layers[layer_idx].logits)

    def loss_fn(item: dict[str, Any]) -> dict[str, torch.Tensor]:
        k, rk = item["k"], item["rk"]
        fb = _to(run.forget_batches[k], device)
        inp = ObjectiveInputs(forget_labels=fb["labels"], forget_mask=fb["attention_mask"],
                              forget_ref_logp=ref["f_logp"].get(k), steering=ref["steering"])
        if objective.forget_reference == "logits":  # the teacher's logits on this forget batch (EUL)
            with torch.no_grad(), _original_weights(model, run.entries, run.originals):
                inp.forget_ref_logits = runner(("f", k), fb)[0]
        rb = None
        if need_retain_pass:
            rb = _to(run.retain_batches[rk], device)
            if ref["trace_w"] is not None:
                inp.retain_weight = ref["trace_w"][rk].to(device)
            if run.retain_ref_kind == "logits":
                with torch.no_grad(), _original_weights(model, run.entries, run.originals):
                    inp.retain_ref_logits = runner(("r", rk), rb)[0]
        terms: dict[str, torch.Tensor] = {}
        extra = []
        with RoutingCapture(model, run.capture_layers, detach=False) as cap:
            inp.forget_logits, inp.forget_hidden = runner(("f", k), fb)
            _align_forget(inp)
            if run.anchor_layers:
                fmask = fb["attention_mask"].reshape(-1).bool()
                vals = []
                for i, exps in run.anchor_layers.items():  # each router on its own device (device_map)
                    scores = routed(cap, i)
                    vals.append(router_anchor_loss(scores, fmask.to(scores.device), anchor_target(
                        by_idx[i].num_experts, exps, device=scores.device)).to(device))
                anchor = torch.stack(vals).mean()
                terms["anchor"] = anchor.detach()
                extra.append(cfg.anchor_weight * anchor)
            if rb is not None:
                cap.clear()
                inp.retain_logits, inp.retain_hidden = runner(("r", rk), rb)
                inp.retain_labels, inp.retain_mask = rb["labels"], rb["attention_mask"]
                inp.retain_ref_hidden = ref["r_hidden"].get(rk)
                _align_retain(inp)
                if run.rr_layers:
                    rmask = rb["attention_mask"].reshape(-1).bool()
                    rr = torch.stack([retain_routing_kl(ref["r_scores"][rk][i], cur, rmask.to(cur.device)).to(device)
                                      for i in run.rr_layers for cur in (routed(cap, i),)]).mean()
                    terms["retain_routing"] = rr.detach()
                    extra.append(cfg.retain_routing_weight * rr)
        out = dict(objective.loss(inp, hp))
        out["loss"] = out["loss"] + sum(e.to(out["loss"].device) for e in extra) if extra else out["loss"]
        out.update(terms)
        return out

    return loss_fn


# -- phase 4: train ----------------------------------------------------------------------------


def _train(run: _Run, loss_fn: Any, callbacks: list[TrainHooks] | None) -> TrainHistory:
    """The shared loop over the trained leaves (fp32 masters for a low-precision model); on any
    error the original weights are written back. The model's mode and requires_grad flags are
    restored either way."""
    model, cfg, plan, device, rank = run.model, run.cfg, run.plan, run.device, run.rank
    items: Any = _ForgetRetainPairs(len(run.forget_batches), len(run.retain_batches) if run.retain_batches else 0,
                                    cfg.seed)
    if run.world_size > 1:  # data parallel: item i of an epoch is rank (i mod world)'s
        items = RankShard(items, rank, run.world_size)
        if items.dropped and rank == 0:
            warnings.warn(f"{items.dropped} of {len(run.forget_batches)} forget batches per epoch are not used: "
                          f"{run.world_size} ranks take equal shares", stacklevel=3)
    for p in model.parameters():
        p.requires_grad_(False)
    slices = _trained_params(run)  # fp32 masters for a low-precision model; low-rank factors with an adapter
    run.trained = slices
    leaves = slices.leaves
    if cfg.adapter is not None:
        run.details["adapter"] = {"kind": cfg.adapter, "rank": cfg.adapter_rank, "low_rank_matrices": len(slices.items),
                                  "trainable_params": slices.num_trainable(), "scope_params": plan.num_trainable()}
    projector = None
    if cfg.router_projection is not None or cfg.expert_projection is not None:
        from moe_unlearn.unlearning.projection import build_projector

        by_idx = run.by_idx
        projector = build_projector(
            model, run.retain_batches, energy=cfg.projection_energy, device=device, slices=slices,
            router_layers=[by_idx[i] for i in plan.router_layers] if cfg.router_projection else [],
            experts=[(by_idx[t.layer], int(t.expert)) for t in run.targets if not t.shared]
            if cfg.expert_projection else [])
        run.details["projections"] = projector.report()
    ckpt_dir = checkpoint_dir_for(cfg.out_dir, cfg.checkpoint_dir, cfg.checkpoint_every, cfg.resume)
    run.ckpt_dir = ckpt_dir
    identity = None
    if ckpt_dir is not None:  # a checkpoint of another run (target, method, data, model) is never resumed
        identity = {"method": cfg.method, "scope": cfg.scope, "targets": [str(t) for t in run.targets],
                    "hparams": run.hp, "anchor_weight": cfg.anchor_weight,
                    "retain_routing_weight": cfg.retain_routing_weight, "batch_size": cfg.batch_size,
                    "max_length": cfg.max_length, "model": config_hash(model),
                    "entries": [[e.name, e.dim, e.start, e.stop] for e in run.entries],
                    "forget": _batches_hash(run.forget_batches), "retain": _batches_hash(run.retain_batches or []),
                    "loss_tokens": cfg.loss_tokens, "router_projection": cfg.router_projection,
                    "expert_projection": cfg.expert_projection, "projection_energy": cfg.projection_energy,
                    "retain_weighting": cfg.retain_weighting, "adapter": cfg.adapter, "adapter_rank": cfg.adapter_rank,
                    "adapter_router": cfg.adapter_router}
    try:  # (checkpoint_every / resume without out_dir or checkpoint_dir: refused by check_unlearn_config)
        run.ckpt_existed = ckpt_dir is not None and ckpt_dir.exists()
        shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.name in UnlearnConfig.names()}
        config = TrainConfig(**{**shared, "steps": cfg.steps if cfg.epochs is None else None,
                                "checkpoint_every": cfg.checkpoint_every if rank == 0 else 0,  # rank 0 writes
                                "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None,
                                "desc": f"unlearn {cfg.method}/{cfg.scope}", "run_identity": identity})
        # order: leaves written into the model, then projected there (and read back), then the caller's hooks
        hooks: list[TrainHooks] = [slices] + ([projector] if projector else [])
        if run.world_size > 1:  # average the trained leaves' gradients and the logged terms over the ranks
            hooks.append(GradAllReduce(leaves, slices.write_back))
        hooks += list(callbacks or [])  # the caller's hooks see averaged gradients and terms
        upper: list[nn.Module] = []
        if cfg.gradient_checkpointing:  # the layers above every trained weight: recomputed in backward
            last = _last_trained_layer(plan)
            upper = list(_layer_list(model))[last + 1:] if last is not None else []
        with checkpointed(upper):
            return train(leaves, loss_fn, items, config, hooks=hooks)
    except BaseException as exc:
        with torch.no_grad():  # leave the model as it was
            params = canonical_parameters(model)
            for e, orig in zip(run.entries, run.originals, strict=True):
                e.view(params).copy_(orig.to(device))
        if isinstance(exc, TrainingDiverged) and ckpt_dir is not None and not run.ckpt_existed:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise
    finally:
        slices.close()
        for n, p in model.named_parameters():
            p.requires_grad_(run.requires_grad[n])
        model.train(run.was_training)


# -- phase 5: outputs --------------------------------------------------------------------------


def _inputs_record(forget: Any, retain: Any, cfg: UnlearnConfig) -> dict[str, Any]:
    """The data and model paths of a run, where they are paths (so patch.json can replay it)."""
    rec: dict[str, Any] = {}
    for key, value in (("forget", forget), ("retain", retain), ("model", cfg.model_dir)):
        if isinstance(value, (str, os.PathLike)) and Path(value).exists():
            rec[key] = str(Path(value).resolve())
    return rec


def _outputs(run: _Run, history: TrainHistory, forget: Any, retain: Any, t0: float) -> UnlearnResult:
    """The patch (or merged model), written by rank 0 only, and the result."""
    cfg, model, rank = run.cfg, run.model, run.rank
    targets = [str(t) for t in run.targets]
    replay = cfg.to_dict()
    replay["target"] = targets or replay["target"]  # an attribution is recorded as the targets it gave
    replay["out_dir"] = None  # a replay writes somewhere new
    info = {"method": cfg.method, "scope": cfg.scope, "targets": targets,
            "hyperparameters": {**run.hp, "lr": cfg.lr, "steps": cfg.steps, "epochs": cfg.epochs,
                                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                                "max_length": cfg.max_length, "lr_schedule": cfg.lr_schedule,
                                "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay,
                                "max_grad_norm": cfg.max_grad_norm, "anchor_weight": cfg.anchor_weight,
                                "retain_routing_weight": cfg.retain_routing_weight, "seed": cfg.seed,
                                "loss_tokens": cfg.loss_tokens, "router_projection": cfg.router_projection,
                                "expert_projection": cfg.expert_projection,
                                "projection_energy": cfg.projection_energy,
                                "retain_weighting": cfg.retain_weighting, "coverage": cfg.coverage,
                                "adapter": cfg.adapter, "adapter_rank": cfg.adapter_rank if cfg.adapter else None,
                                "adapter_router": cfg.adapter_router},
            **run.details,
            "final_terms": history.final(), "steps_run": len(history.steps),
            "trainable_params": _num_trainable(run),
            "config": replay, "inputs": _inputs_record(forget, retain, cfg)}
    out_path = run.out_path
    patch_path = merged_path = None
    try:
        if out_path is not None and cfg.merge:
            merged_path = out_path
            if rank == 0:  # every rank holds the same weights; one writes
                _save_merged(model, out_path, run.entries)
        elif out_path is not None:
            patch_path = out_path
            if rank == 0:
                write_patch(out_path, model, run.entries, run.originals, info, **_lowrank_parts(run))
    except BaseException:
        with torch.no_grad():  # nothing was written: leave the model as it was, too
            params = canonical_parameters(model)
            for e, orig in zip(run.entries, run.originals, strict=True):
                e.view(params).copy_(orig.to(run.device))
        raise
    ckpt_dir = run.ckpt_dir
    if ckpt_dir is not None and not run.ckpt_existed and out_path is not None and rank == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    barrier()  # no rank returns before the patch exists
    return UnlearnResult(patch_path=patch_path, merged_path=merged_path, method=cfg.method, scope=cfg.scope,
                         targets=targets, history=history, trainable_params=_num_trainable(run),
                         optimizer_state_bytes=history.optimizer_state_bytes,
                         wall_time=time.perf_counter() - t0, final_terms=history.final(),
                         prefix_cache_start=run.runner.start, details=run.details)


def _num_trainable(run: _Run) -> int:
    return run.trained.num_trainable() if hasattr(run.trained, "num_trainable") else run.plan.num_trainable()


def _lowrank_parts(run: _Run) -> dict[str, Any]:
    """write_patch's lowrank= and grams= for an adapter run (nothing otherwise)."""
    if run.cfg.adapter is None:
        return {}
    factors = run.trained.factors()
    lowrank = {i: factors[(e.name, e.dim, e.start, e.stop)] for i, e in enumerate(run.entries)
               if (e.name, e.dim, e.start, e.stop) in factors}
    return {"lowrank": lowrank, "grams": run.grams}


def _save_merged(model: nn.Module, out_dir: Path, entries: list[PatchEntry]) -> Path:
    """save_pretrained into a temp dir beside out_dir, then rename (no half-written model); refused
    (nothing written) when a trained entry holds NaN/inf."""
    params = canonical_parameters(model)
    for e in entries:
        v = e.view(params)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TrainingDiverged(f"{e.name} holds NaN/inf values after unlearning; nothing was written")
    with atomic_dir(out_dir) as tmp:  # an existing out_dir can only be empty here (checked by the caller)
        model.save_pretrained(tmp)
    return out_dir
