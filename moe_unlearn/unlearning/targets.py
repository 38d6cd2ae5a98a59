"""Stage 1, targets: which experts a run unlearns (given, or chosen from an attribution of the forget set).

Only the scopes that read targets have any (`Scope.reads_targets`); `target=None` attributes the
forget data now. An attribution gives the top expert (uoe), the top `top_m` (topm, of `topm_layer`
if given) or, with `coverage`, the experts that together cover that share of the forget tokens.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_unlearn.arch.target import ExpertTarget
from moe_unlearn.errors import BadInputError
from moe_unlearn.unlearning.checks import target_list
from moe_unlearn.unlearning.config import UnlearnConfig
from moe_unlearn.unlearning.scopes import SCOPES


def choose_targets(cfg: UnlearnConfig, model: nn.Module, forget: Any, retain: Any, tokenizer: Any) -> list[ExpertTarget]:
    """The run's target experts (empty for a scope that reads none)."""
    scope = SCOPES.lookup(cfg.scope)
    if not scope.reads_targets:
        return []
    from moe_unlearn.attribution import Attribution, attribute_experts, select_targets

    target = cfg.target
    if target is None:
        target = attribute_experts(model, forget, tokenizer=tokenizer, batch_size=cfg.batch_size,
                                   max_length=cfg.max_length, progress=cfg.progress, retain=retain)
    if cfg.coverage is not None:
        if not isinstance(target, Attribution):
            raise BadInputError("coverage=... chooses the targets from an attribution; give target=None (attribute "
                                "now) or an Attribution, not explicit experts")
        return [ExpertTarget(lay, e) for lay, e in select_targets(target, coverage=cfg.coverage)]
    if isinstance(target, Attribution):
        return _from_attribution(target, model, m=scope.max_targets or cfg.top_m, layer=cfg.topm_layer)
    return [ExpertTarget.coerce(t) for t in target_list(target)]


def _from_attribution(attr: Any, model: nn.Module, *, m: int, layer: int | None) -> list[ExpertTarget]:
    attr.check_model(model)  # an attribution of another model names the wrong experts
    entries = attr.ranking(layer=layer)[:m] if layer is not None else attr.top(m)
    if len(entries) < m:
        raise BadInputError(f"top_m={m} but the attribution has only {len(entries)} candidate experts"
                            f"{'' if layer is None else f' in layer {layer}'}; lower top_m")
    if attr.token_topk is not None or (len(entries) == 1 and attr.retain_frequency is not None):
        attr.premise([(e.layer, e.expert) for e in entries])  # PremiseWarning when UOE's premise fails
    return [ExpertTarget(e.layer, e.expert) for e in entries]


__all__ = ["choose_targets"]
