"""`unlearn()`: one function from (model, forget data) to an unlearning patch.

    result = unlearn(model, forget_texts, retain_texts, tokenizer=tok, method="npo", scope="uoe",
                     out_dir="patches/req-001")
    revert_patch(model, result.patch_path)    # the model is back to the original, bit-exactly

The path, top to bottom: load and tokenize the data -> choose targets (given, or from an
attribution) -> resolve the scope into trained tensors / expert slices -> compute reference
values once with the original weights -> train with the shared loop (moe_unlearn.training)
-> write the patch (or a merged model).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch import MoELayer, RoutingCapture, find_moe_layers
from moe_unlearn.arch.discovery import adapter_for, decoder_layers
from moe_unlearn.arch.stack import DecoderStack
from moe_unlearn.atomic import atomic_dir, check_out_dir
from moe_unlearn.errors import BadInputError, DataError, NotAnMoEModel, TrainingDiverged
from moe_unlearn.training import TrainConfig, TrainHistory, TrainHooks, train
from moe_unlearn.unlearning.anchor import anchor_target, retain_routing_kl, router_anchor_loss
from moe_unlearn.unlearning.checks import check_unlearn_args, checkpoint_dir_for
from moe_unlearn.unlearning.objectives import ObjectiveInputs, get_objective, rmu_steering, sequence_nll
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
             what: str, loss_tokens: str, seed: int, model: nn.Module | None = None):
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
            examples = load_examples(source, field=field_name)
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
    params = dict(model.named_parameters())
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


def _entries(plan: ScopePlan) -> list[PatchEntry]:
    return [PatchEntry(n) for n, _ in plan.whole] + [PatchEntry(s.name, s.dim, s.start, s.stop)
                                                    for s in plan.slices]


def _prefix_start(plan: ScopePlan) -> int | None:
    """First decoder layer holding trained weights, or None if anything outside the layers trains."""
    found = []
    for name in [n for n, _ in plan.whole] + [s.name for s in plan.slices]:
        m = _LAYER_RE.search(name)
        if m is None:
            return None
        found.append(int(m.group(1)))
    return min(found) if found else None


# -- the API -----------------------------------------------------------------------------------


def unlearn(
    model: nn.Module,
    forget: Any,
    retain: Any = None,
    *,
    tokenizer: Any = None,
    method: str = "npo",
    scope: str = "uoe",
    target: Any = None,
    top_m: int = 2,
    topm_layer: int | None = None,
    allow_shared: bool = False,
    steps: int | None = 20,
    epochs: int | None = None,
    lr: float = 1e-4,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_length: int = 256,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    anchor_weight: float = 1.0,
    retain_routing_weight: float = 0.0,
    method_kwargs: dict[str, Any] | None = None,
    prefix_cache: bool = True,
    prefix_cache_mb: float = 1024,
    out_dir: str | os.PathLike | None = None,
    merge: bool = False,
    model_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    seed: int = 0,
    bf16: bool | str = "auto",
    progress: bool = True,
    field: str | None = None,
    loss_tokens: str = "answer",
    callbacks: list[TrainHooks] | None = None,
    router_projection: str | None = None,
    expert_projection: str | None = None,
    projection_energy: float = 0.99,
    retain_weighting: str | None = None,
    coverage: float | None = None,
) -> UnlearnResult:
    """Unlearn `forget` from `model` IN PLACE and write a patch that undoes / redoes it.

    forget / retain: anything `moe_unlearn.data.load_texts` reads (list of strings, .txt,
      .jsonl, dataset dir) or `TokenizedBatches`. retain is optional except for graddiff.
    method: a name in `objectives.OBJECTIVES` (ga, graddiff, npo, simnpo, rmu); method_kwargs
      override its hyperparameters (e.g. {"beta": 0.1, "retain_loss": "kl"}).
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
    out_dir: new (or empty) directory for the patch (or, with merge=True, the merged model);
      None writes nothing. The model's own directory is refused.
    The model is left in its original train/eval mode with the unlearned weights in place; on a
    NaN/inf loss the original weights are restored, TrainingDiverged is raised and nothing is written.
    """
    t0 = time.perf_counter()
    objective = get_objective(method)
    mdir = _model_dir(model, model_dir)
    hp = check_unlearn_args(  # everything that needs no forward pass, before any work
        method=method, scope=scope, target=target, top_m=top_m, topm_layer=topm_layer, steps=steps, epochs=epochs,
        lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, lr_schedule=lr_schedule,
        warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        anchor_weight=anchor_weight, retain_routing_weight=retain_routing_weight, method_kwargs=method_kwargs,
        prefix_cache_mb=prefix_cache_mb, checkpoint_every=checkpoint_every, seed=seed,
        has_retain=retain is not None, merge=merge, out_dir=out_dir, model_dir=mdir, resume=resume,
        checkpoint_dir=checkpoint_dir)
    from moe_unlearn.data import LOSS_TOKENS

    if loss_tokens not in LOSS_TOKENS:
        raise BadInputError(f"loss_tokens must be one of {', '.join(LOSS_TOKENS)}, got {loss_tokens!r}")
    out_path = Path(out_dir) if out_dir is not None else None
    from moe_unlearn.unlearning.projection import EXPERT_PROJECTIONS, ROUTER_PROJECTIONS
    from moe_unlearn.unlearning.trace import RETAIN_WEIGHTINGS

    for name, value, valid in (("router_projection", router_projection, ROUTER_PROJECTIONS),
                               ("expert_projection", expert_projection, EXPERT_PROJECTIONS),
                               ("retain_weighting", retain_weighting, RETAIN_WEIGHTINGS)):
        if value not in valid:
            raise BadInputError(f"{name} must be one of {[v for v in valid if v]} or None, got {value!r}")
        if value is not None and retain is None:
            raise BadInputError(f"{name}={value!r} needs retain data (retain=...)")
    if expert_projection is not None and scope not in ("uoe", "topm"):
        raise BadInputError(f"expert_projection={expert_projection!r} projects trained expert slices: use scope "
                            f"uoe or topm (got {scope!r})")
    if not (isinstance(projection_energy, (int, float)) and 0.0 < projection_energy <= 1.0):
        raise BadInputError(f"projection_energy must be in (0, 1], got {projection_energy!r}")

    forget_batches = _batches(forget, tokenizer, batch_size=batch_size, max_length=max_length, field_name=field,
                              what="forget", loss_tokens=loss_tokens, seed=seed, model=model)
    retain_batches = (_batches(retain, tokenizer, batch_size=batch_size, max_length=max_length,
                               field_name=field, what="retain", loss_tokens=loss_tokens, seed=seed + 1, model=model)
                      if retain is not None else None)
    layers = find_moe_layers(model)
    if coverage is not None and scope != "topm":
        raise BadInputError(f"coverage={coverage} selects several experts: use scope 'topm' (got {scope!r})")
    targets = _parse_targets(target, scope, model=model, forget_source=forget, tokenizer=tokenizer, top_m=top_m,
                             topm_layer=topm_layer, batch_size=batch_size, max_length=max_length,
                             progress=progress, coverage=coverage, retain_source=retain)
    plan = resolve_scope(model, layers, scope, targets, allow_shared=allow_shared)
    if out_path is not None:  # now that the size is known: room for the patch (new + old values) or the model
        need = (sum(p.numel() * p.element_size() for p in model.parameters()) if merge
                else 2 * sum(p.element_size() * p.numel() for _, p in plan.whole)
                + 2 * sum(s.numel * s.param.element_size() for s in plan.slices))
        check_out_dir(out_path, model_dirs=(mdir,), must_be_empty=True, what="out_dir", need_bytes=need)
    by_idx: dict[int, MoELayer] = {layer.layer_idx: layer for layer in layers}
    if router_projection is not None and not plan.router_layers:
        raise BadInputError(f"router_projection={router_projection!r}: scope {scope!r} trains no router")
    device = next(model.parameters()).device

    # which layers the step must run, and which hidden state RMU reads
    start = _prefix_start(plan) if prefix_cache else None
    rmu_layer = None
    if method == "rmu":
        num_layers = len(_layer_list(model))
        rmu_layer = hp["layer"]
        if rmu_layer is None:
            trained = {t.layer for t in targets} or None
            rmu_layer = max(trained) if trained else num_layers // 2
        if not 0 <= rmu_layer < num_layers:
            raise BadInputError(f"rmu layer {rmu_layer} out of range (0..{num_layers - 1})")
        first = _prefix_start(plan)
        if first is not None and rmu_layer < first:
            raise BadInputError(f"rmu layer {rmu_layer} is below every trained layer (first: {first}); its output "
                                "cannot change. Choose layer >= the target layer")
    runner = _Runner(model, start=start, cache_bytes=int(prefix_cache_mb * 2**20), cache=prefix_cache,
                     hidden_layer=rmu_layer, need_logits=objective.needs_logits)
    ref_runner = _Runner(model, start=None, cache_bytes=0, cache=False, hidden_layer=rmu_layer,
                         need_logits=True)

    anchor_layers = {}
    if scope in ("uoe", "topm") and anchor_weight:
        for t in targets:
            if not t.shared:
                anchor_layers.setdefault(t.layer, []).append(int(t.expert))
    rr_layers = plan.router_layers if retain_routing_weight else []
    capture_layers = [by_idx[i] for i in sorted(set(anchor_layers) | set(rr_layers))]
    retain_ref_kind = objective.retain_reference(hp) if retain_batches is not None else None

    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    entries = _entries(plan)
    originals = snapshot(model, entries)
    model.eval()  # deterministic steps (no dropout); reference values line up with the trained passes

    # -- reference values, computed once with the original weights --------------------------
    ref: dict[str, dict[int, Any]] = {"f_logp": {}, "r_hidden": {}, "r_scores": {}}
    with torch.no_grad():
        if objective.forget_reference == "logp":
            for k, b in enumerate(forget_batches):
                b = _to(b, device)
                logits, _ = ref_runner(("f", k), b)
                ref["f_logp"][k] = -sequence_nll(logits, b["labels"])[0]
        if retain_batches is not None and (retain_ref_kind == "hidden" or rr_layers):
            for k, b in enumerate(retain_batches):
                b = _to(b, device)
                with RoutingCapture(model, [by_idx[i] for i in rr_layers]) as cap:
                    _, hidden = ref_runner(("r", k), b)
                if retain_ref_kind == "hidden":
                    ref["r_hidden"][k] = hidden
                if rr_layers:
                    ref["r_scores"][k] = {i: by_idx[i].scores_from_logits(cap.records[-1].layers[i].logits)
                                          for i in rr_layers}
    details: dict[str, Any] = {}
    trace_w = None
    if retain_weighting == "trace":
        from moe_unlearn.unlearning.trace import trace_weights

        critical = None
        if targets:
            critical = {}
            for t in targets:
                if not t.shared:
                    critical.setdefault(t.layer, []).append(int(t.expert))
        trace_layers = [by_idx[i] for i in sorted(critical)] if critical is not None else layers
        trace_w, details["trace"] = trace_weights(model, forget_batches, retain_batches, trace_layers, critical,
                                                  device)
    steering = (rmu_steering(model.config.hidden_size, hp["steering_coeff"], seed=seed, device=device)
                if method == "rmu" else None)

    items = _ForgetRetainPairs(len(forget_batches), len(retain_batches) if retain_batches else 0, seed)
    need_retain_pass = retain_batches is not None and (
        objective.name == "rmu" or objective.requires_retain or hp.get("alpha", 0) or rr_layers)

    def routed(cap: RoutingCapture, layer_idx: int) -> torch.Tensor:
        return by_idx[layer_idx].scores_from_logits(cap.records[-1].layers[layer_idx].logits)

    def loss_fn(item: dict[str, Any]) -> dict[str, torch.Tensor]:
        k, rk = item["k"], item["rk"]
        fb = _to(forget_batches[k], device)
        inp = ObjectiveInputs(forget_labels=fb["labels"], forget_mask=fb["attention_mask"],
                              forget_ref_logp=ref["f_logp"].get(k), steering=steering)
        rb = None
        if need_retain_pass:
            rb = _to(retain_batches[rk], device)
            if trace_w is not None:
                inp.retain_weight = trace_w[rk].to(device)
            if retain_ref_kind == "logits":
                with torch.no_grad(), _original_weights(model, entries, originals):
                    inp.retain_ref_logits = runner(("r", rk), rb)[0]
        terms: dict[str, torch.Tensor] = {}
        extra = []
        with RoutingCapture(model, capture_layers, detach=False) as cap:
            inp.forget_logits, inp.forget_hidden = runner(("f", k), fb)
            if anchor_layers:
                fmask = fb["attention_mask"].reshape(-1).bool()
                vals = [router_anchor_loss(routed(cap, i), fmask,
                                           anchor_target(by_idx[i].num_experts, exps, device=device))
                        for i, exps in anchor_layers.items()]
                anchor = torch.stack(vals).mean()
                terms["anchor"] = anchor.detach()
                extra.append(anchor_weight * anchor)
            if rb is not None:
                cap.clear()
                inp.retain_logits, inp.retain_hidden = runner(("r", rk), rb)
                inp.retain_labels, inp.retain_mask = rb["labels"], rb["attention_mask"]
                inp.retain_ref_hidden = ref["r_hidden"].get(rk)
                if rr_layers:
                    rmask = rb["attention_mask"].reshape(-1).bool()
                    rr = torch.stack([retain_routing_kl(ref["r_scores"][rk][i], routed(cap, i), rmask)
                                      for i in rr_layers]).mean()
                    terms["retain_routing"] = rr.detach()
                    extra.append(retain_routing_weight * rr)
        out = dict(objective.loss(inp, hp))
        out["loss"] = out["loss"] + sum(extra) if extra else out["loss"]
        out.update(terms)
        return out

    # -- train --------------------------------------------------------------------------------
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in plan.whole:
        p.requires_grad_(True)
    slices = SliceParams(plan.slices) if plan.slices else None
    leaves = [p for _, p in plan.whole] + (slices.shadows if slices else [])
    projector = None
    if router_projection is not None or expert_projection is not None:
        from moe_unlearn.unlearning.projection import build_projector

        projector = build_projector(
            model, retain_batches, energy=projection_energy, device=device, slices=slices,
            router_layers=[by_idx[i] for i in plan.router_layers] if router_projection else [],
            experts=[(by_idx[t.layer], int(t.expert)) for t in targets if not t.shared] if expert_projection
            else [])
        details["projections"] = projector.report()
    ckpt_dir = checkpoint_dir_for(out_dir, checkpoint_dir, checkpoint_every, resume)
    ckpt_existed = ckpt_dir is not None and ckpt_dir.exists()
    identity = None
    if ckpt_dir is not None:  # a checkpoint of another run (target, method, data, model) is never resumed
        identity = {"method": method, "scope": scope, "targets": [str(t) for t in targets], "hparams": hp,
                    "anchor_weight": anchor_weight, "retain_routing_weight": retain_routing_weight,
                    "batch_size": batch_size, "max_length": max_length, "model": config_hash(model),
                    "entries": [[e.name, e.dim, e.start, e.stop] for e in entries],
                    "forget": _batches_hash(forget_batches), "retain": _batches_hash(retain_batches or []),
                    "loss_tokens": loss_tokens, "router_projection": router_projection,
                    "expert_projection": expert_projection, "projection_energy": projection_energy,
                    "retain_weighting": retain_weighting}
    config = TrainConfig(steps=steps if epochs is None else None, epochs=epochs, batch_size=batch_size,
                         grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, bf16=bf16,
                         checkpoint_every=checkpoint_every, checkpoint_dir=str(ckpt_dir) if ckpt_dir else None,
                         resume=resume, progress=progress, desc=f"unlearn {method}/{scope}", run_identity=identity)
    # order: shadows written into the model, then projected there (and read back), then the caller's hooks
    hooks: list[TrainHooks] = ([slices] if slices else []) + ([projector] if projector else []) + list(callbacks or [])
    try:
        history = train(leaves, loss_fn, items, config, hooks=hooks)
    except BaseException as exc:
        with torch.no_grad():  # leave the model as it was
            params = dict(model.named_parameters())
            for e, orig in zip(entries, originals, strict=True):
                e.view(params).copy_(orig.to(device))
        if isinstance(exc, TrainingDiverged) and ckpt_dir is not None and not ckpt_existed:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise
    finally:
        if slices:
            slices.close()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)

    # -- output -------------------------------------------------------------------------------
    info = {"method": method, "scope": scope, "targets": [str(t) for t in targets],
            "hyperparameters": {**hp, "lr": lr, "steps": steps, "epochs": epochs, "batch_size": batch_size,
                                "grad_accum": grad_accum, "max_length": max_length, "lr_schedule": lr_schedule,
                                "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                                "max_grad_norm": max_grad_norm, "anchor_weight": anchor_weight,
                                "retain_routing_weight": retain_routing_weight, "seed": seed,
                                "loss_tokens": loss_tokens, "router_projection": router_projection,
                                "expert_projection": expert_projection, "projection_energy": projection_energy,
                                "retain_weighting": retain_weighting, "coverage": coverage},
            **details,
            "final_terms": history.final(), "steps_run": len(history.steps),
            "trainable_params": plan.num_trainable()}
    patch_path = merged_path = None
    try:
        if out_path is not None and merge:
            merged_path = _save_merged(model, out_path, entries)
        elif out_path is not None:
            patch_path = write_patch(out_path, model, entries, originals, info)
    except BaseException:
        with torch.no_grad():  # nothing was written: leave the model as it was, too
            params = dict(model.named_parameters())
            for e, orig in zip(entries, originals, strict=True):
                e.view(params).copy_(orig.to(device))
        raise
    if ckpt_dir is not None and not ckpt_existed and out_path is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return UnlearnResult(patch_path=patch_path, merged_path=merged_path, method=method, scope=scope,
                         targets=[str(t) for t in targets], history=history,
                         trainable_params=plan.num_trainable(),
                         optimizer_state_bytes=history.optimizer_state_bytes,
                         wall_time=time.perf_counter() - t0, final_terms=history.final(),
                         prefix_cache_start=runner.start, details=details)


def _save_merged(model: nn.Module, out_dir: Path, entries: list[PatchEntry]) -> Path:
    """save_pretrained into a temp dir beside out_dir, then rename (no half-written model)."""
    params = dict(model.named_parameters())
    for e in entries:
        v = e.view(params)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TrainingDiverged(f"{e.name} holds NaN/inf values after unlearning; nothing was written")
    with atomic_dir(out_dir) as tmp:  # an existing out_dir can only be empty here (checked by the caller)
        model.save_pretrained(tmp)
    return out_dir

