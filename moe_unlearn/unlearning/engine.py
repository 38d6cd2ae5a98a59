"""`unlearn()`: one function from (model, forget data) to an unlearning patch.

    result = unlearn(model, forget_texts, retain_texts, tokenizer=tok, method="npo", scope="uoe",
                     out_dir="patches/req-001")
    revert_patch(model, result.patch_path)    # the model is back to the original, bit-exactly

The run's knobs are one `UnlearnConfig` (moe_unlearn.unlearning.config); keyword arguments of
`unlearn()` build it. The path, top to bottom, one stage per module, each handing typed values on:
  checks       every model-free check of the config (checks.py)
  targets      the experts to unlearn: given, or chosen from an attribution (targets.py)
  plan         the trained tensors, the layers a step runs, anchor / KL layers (plan.py)
  batches      forget and retain data as padded batches (batches.py)
  references   values of the original model, once (references.py)
  step loss    objective + router anchor + retain-routing KL of one step (step.py)
  fit          the shared loop over the trainable parameters (params.py, fit.py), or the edit of a
               method that trains nothing (ablate)
  outputs      the patch or the merged model, written by rank 0 (outputs.py)
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from torch import nn

from moe_unlearn.arch.forcing import ForcedRouting
from moe_unlearn.arch.wrappers import is_peft_layer, unwrap_model
from moe_unlearn.distributed import world as dist_world
from moe_unlearn.errors import BadInputError
from moe_unlearn.loading import input_device
from moe_unlearn.sharding import prepare as prepare_shards
from moe_unlearn.sharding import resolve_shard
from moe_unlearn.training import TrainHooks
from moe_unlearn.unlearning.batches import Batches, make_batches
from moe_unlearn.unlearning.checks import check_unlearn_config
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.fit import World, apply_edit, fit
from moe_unlearn.unlearning.methods import get_method
from moe_unlearn.unlearning.outputs import UnlearnResult, check_room, model_dir_of, write_outputs
from moe_unlearn.unlearning.patch import snapshot
from moe_unlearn.unlearning.plan import make_plan
from moe_unlearn.unlearning.references import compute_references
from moe_unlearn.unlearning.runner import Runner
from moe_unlearn.unlearning.step import StepLoss
from moe_unlearn.unlearning.targets import choose_targets
from moe_unlearn.unlearning.undo import DistillLoss, distill_config, noise_tensors


def trained_names(model: nn.Module, config: UnlearnConfig) -> list[str]:
    """The parameters a run of `config` changes on `model`, which may be a meta-device model: what a
    sharded load keeps whole, known before any weight is read. The targets must be given (experts or
    an Attribution): choosing them would run the model."""
    from moe_unlearn.unlearning.scopes import SCOPES

    if config.target is None and SCOPES.lookup(config.scope).reads_targets:
        raise BadInputError(f"scope {config.scope!r} with a model loaded sharded needs its targets before the weights "
                            "are read: give --target L:E or --attribution FILE (moe-unlearn attribute --shard fsdp2 "
                            "writes one)")
    hp = check_unlearn_config(config, has_retain=True, model_dir=None)
    targets = choose_targets(config, model, None, None, None)
    return sorted({t.name for t in make_plan(config, get_method(config.method), hp, model, targets).tensors})


def unlearn(model: nn.Module, forget: Any, retain: Any = None, *, tokenizer: Any = None,
            config: UnlearnConfig | None = None, callbacks: list[TrainHooks] | None = None,
            **options: Any) -> UnlearnResult:
    """Unlearn `forget` from `model` IN PLACE and write a patch that undoes / redoes it.

    The run's knobs are an `UnlearnConfig` (`config=`), or keyword arguments naming its fields
    (they override `config`'s values): `unlearn(model, f, r, tokenizer=tok, lr=1e-5)`; each field's
    help says what it does (`UnlearnConfig.options()`), the main ones:
    forget / retain: anything `moe_unlearn.data.load_texts` reads (list of strings, .txt,
      .jsonl, dataset dir) or `TokenizedBatches`. retain is optional except for graddiff.
    method: a name in `methods.METHODS`: the objectives (ga, graddiff, npo, simnpo, rmu, eul),
      whose hyperparameters method_kwargs override (e.g. {"beta": 0.1, "retain_loss": "kl"}), and
      "ablate" (uoe/topm), which trains nothing: the targets' down projections are zeroed, as a patch.
    scope: full | all_but_routers | experts | routers | uoe | topm. target (uoe/topm): "L:E", (L, E), a list of
      those, "L:shared" (needs allow_shared=True), or an `Attribution`; None = attribute the
      forget set now. topm takes the top `top_m` experts (of `topm_layer` if given), or with
      `coverage` the experts that together cover that share of the forget tokens.
    routing: "learned" (default: the scope's routers train), "frozen" (no router trains, no anchor) or
      "forced" (frozen, and each batch's original top-K and gates are forced at every MoE layer);
      composes with every method, scope (but routers), target and coverage.
    anchor_weight: SEUF router anchor on the target layers (uoe / topm, learned routing; 0 turns it off).
    distill_steps / distill_noise: UNDO (moe_unlearn.unlearning.undo): after unlearning, the trained tensors
      are noised and the unlearned model is distilled back into them (0 steps = off).
    sam_rho: sharpness-aware unlearning (moe_unlearn.unlearning.sam): the forget loss's gradient is taken
      at the trained tensors moved by sam_rho along its normalised gradient (0 = off).
    retain_routing_weight: KL(original || current) routing on retain tokens at every trained router.
    prefix_cache: with all trained weights in layers >= l, run only layers >= l each step and
      cache the states entering l (bounded by prefix_cache_mb; beyond it they are recomputed).
    loss_tokens: "answer" (default): question/answer records score their answer tokens only;
      "all": every token of every text.
    seed: orders the forget and retain texts into batches, the forget batches per epoch and
      the forget/retain pairing (the same seed reproduces a run bit-exactly).
    router_projection="grip", expert_projection="retain_null", retain_weighting="trace": the
      MoE-aware variants (moe_unlearn.unlearning.projection / .trace); all need retain data.
    adapter="lora" (uoe / topm / experts): each expert matrix trains as W0 + B A of rank
      `adapter_rank`; the patch stores the factors and the Gram statistics `fuse_patches` merges with.
    callbacks: extra `TrainHooks` (e.g. evaluate the model every N steps); they run after the
      engine's own hooks, so after_step sees the updated weights in the model.
    out_dir: new (or empty) directory for the patch (or, with merge=True, the merged model);
      None writes nothing. The model's own directory is refused.
    Under torch.distributed (torchrun) the data is split over the ranks and the trained slices'
    gradients are averaged (moe_unlearn.distributed); only rank 0 writes. shard="fsdp2" (or a
    model already wrapped with fully_shard) shards every layer over the ranks with FSDP2, the
    trained tensors kept whole (moe_unlearn.sharding); the model is left sharded.
    The model is left in its original train/eval mode with the unlearned weights in place; on a
    NaN/inf loss the original weights are restored, TrainingDiverged is raised and nothing is written.
    """
    t0 = time.perf_counter()
    cfg = UnlearnConfig.build(config, **options)
    model = unwrap_model(model)  # DDP / FSDP1 / DeepSpeed / PEFT wrappers: train the model inside
    shard = resolve_shard(cfg.shard, model)  # sharded parameters without shard="fsdp2": one clear error, no work
    rank, world_size = dist_world()
    cfg.progress = cfg.progress and rank == 0
    mdir = model_dir_of(model, cfg.model_dir)
    hp = check_unlearn_config(cfg, has_retain=retain is not None, model_dir=mdir)  # the CLI runs it too
    method = get_method(cfg.method)
    if cfg.merge and cfg.out_dir is not None and any(is_peft_layer(m) for m in model.modules()):
        raise BadInputError("merge=True on a PEFT-wrapped model would save PEFT's layers inside the model; write "
                            "a patch instead (it applies to the stock model), or merge_and_unload() the PEFT "
                            "adapter first")
    # a method that trains reads the data; every method reads the targets (attributed from the forget set)
    batches = make_batches(cfg, forget, retain, tokenizer, model) if method.trains else Batches([], None)
    targets = choose_targets(cfg, model, forget, retain, tokenizer)
    plan = make_plan(cfg, method, hp, model, targets)
    check_room(cfg, model, plan, mdir)
    # FSDP2: every layer sharded over the ranks, the tensors the plan trains kept whole (moe_unlearn.sharding)
    stack_ok = prepare_shards(model, [t.name for t in plan.tensors]) if shard else True
    world = World(input_device(model), rank, world_size)  # the first device of a device_map model
    was_training = model.training  # references and steps run in eval mode (no dropout); fit() restores it
    ref = compute_references(cfg, method.objective, hp, model, plan, batches, world.device)
    if not method.trains:
        outcome = apply_edit(method, model, plan, ref)
    else:
        runner = Runner(model, start=plan.start if stack_ok else None, cache_bytes=int(cfg.prefix_cache_mb * 2**20),
                        cache=cfg.prefix_cache, hidden_layer=plan.hidden_layer,
                        need_logits=method.objective.needs_logits)
        forced = ForcedRouting(plan.layers) if ref.forced_routing is not None else None
        loss_fn = StepLoss(cfg, method.objective, hp, model, plan, batches, ref, runner, world.device, forced)
        with forced if forced is not None else contextlib.nullcontext():  # hooks live through backward too
            outcome = fit(cfg, hp, model, plan, batches, ref, loss_fn, world, callbacks=callbacks,
                          was_training=was_training, prefix_cache_start=runner.start)
            if cfg.distill_steps:  # UNDO: noise what was trained, distil the unlearned model back into it
                outcome.details["undo"] = _undo(cfg, hp, model, plan, batches, ref, runner, world, forced,
                                                callbacks, was_training)
    return write_outputs(cfg, method, hp, model, plan, ref, outcome, forget=forget, retain=retain, rank=rank, t0=t0)


def _undo(cfg: UnlearnConfig, hp: dict[str, Any], model: nn.Module, plan: Any, batches: Batches, ref: Any,
          runner: Runner, world: World, forced: ForcedRouting | None, callbacks: list[TrainHooks] | None,
          was_training: bool) -> dict[str, Any]:
    """The distillation phase (moe_unlearn.unlearning.undo) on the plan's tensors; its summary for the report."""
    teacher = snapshot(model, list(plan.tensors))  # the unlearned values
    noise_tensors(model, plan.tensors, cfg.distill_noise, cfg.seed)
    model.eval()
    loss = DistillLoss(model, plan, batches, teacher, runner, world.device, forced, ref.forced_routing)
    out = fit(distill_config(cfg), hp, model, plan, batches, ref, loss, world, callbacks=callbacks,
              was_training=was_training, prefix_cache_start=runner.start)
    kl = out.history.terms.get("distill_kl", [])
    return {"steps": cfg.distill_steps, "noise": cfg.distill_noise, "first_kl": kl[0] if kl else None,
            "final_kl": kl[-1] if kl else None}


__all__ = ["UnlearnResult", "unlearn"]
