"""Unlearning objectives: each method is one small loss function, registered by name.

Formulas as in the open-unlearning framework (NPO beta 0.1; SimNPO beta 4.5, delta 0, gamma 0.125;
RMU: MSE to a scaled random direction on forget, to the original hidden state on retain). Every function here works
on plain tensors (logits, labels, hidden states, cached reference values) so it can be
checked by hand; the engine does the forward passes. The language-model terms are always
computed from logits and labels, never from `outputs.loss`: with output_router_logits=True
transformers adds the router load-balancing loss into `outputs.loss`, and a forget
objective must never negate that.

To add a method: write `def my_loss(inp: ObjectiveInputs, hp: dict) -> dict[str, Tensor]`
and register it in OBJECTIVES with its defaults and the reference values it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moe_unlearn.errors import BadInputError

IGNORE = -100


# -- LM quantities ---------------------------------------------------------------------------


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL. logits [B, S, V], labels [B, S] (IGNORE = not scored) ->
    (nll [B, S-1] fp32 with 0 at unscored positions, valid [B, S-1] bool)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(shift_labels.shape)
    return nll * valid, valid


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL [B] and number of scored tokens [B] (NLL_sum and |y| of the NPO / SimNPO formulas)."""
    nll, valid = token_nll(logits, labels)
    return nll.sum(1), valid.sum(1)


def _position_weights(valid: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per next-token position weights [B, S-1]: 1 (or weight[b, t] of the predicting token t) where scored."""
    w = valid.float()
    return w if weight is None else w * weight[:, :-1].to(w)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross-entropy over every scored token of the batch (what HF's CE loss is); with
    weight [B, S], a weighted mean (position t's loss weighted by weight[:, t], the predicting token)."""
    nll, valid = token_nll(logits, labels)
    w = _position_weights(valid, weight)
    return (nll * w).sum() / w.sum().clamp_min(1e-12 if weight is not None else 1)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per next-token position, mean (weighted as in mean_nll) over scored positions."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    w = _position_weights(labels[:, 1:] != IGNORE, weight)
    return (kl * w).sum() / w.sum().clamp_min(1e-12 if weight is not None else 1)


def masked_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens and hidden dims of (hidden - target)^2; hidden [B, S, H], mask [B, S];
    with weight [B, S] a token-weighted mean."""
    m = mask.to(hidden.dtype) if weight is None else mask.to(hidden.dtype) * weight.to(hidden.dtype)
    m = m.unsqueeze(-1)
    sq = (hidden.float() - target.float()) ** 2 * m
    return sq.sum() / (m.sum().clamp_min(1) * hidden.shape[-1])


# -- inputs ------------------------------------------------------------------------------------


@dataclass
class ObjectiveInputs:
    """What one step's forward passes produced, plus cached reference values.

    forget_ref_logp / retain_ref_logp: [B] sequence log-prob sums under the original model.
    forget_ref_logits / retain_ref_logits: [B, S, V] original-model logits (the KL terms).
    *_hidden: [B, S, H] output of the RMU layer; retain_ref_hidden: same with original weights.
    steering: [H] the RMU target c * u. *_mask: [B, S] attention masks (1 = real token).
    """

    forget_logits: torch.Tensor | None = None
    forget_labels: torch.Tensor | None = None
    forget_mask: torch.Tensor | None = None
    forget_ref_logp: torch.Tensor | None = None
    forget_ref_logits: torch.Tensor | None = None
    forget_hidden: torch.Tensor | None = None
    retain_logits: torch.Tensor | None = None
    retain_labels: torch.Tensor | None = None
    retain_mask: torch.Tensor | None = None
    retain_ref_logits: torch.Tensor | None = None
    retain_hidden: torch.Tensor | None = None
    retain_ref_hidden: torch.Tensor | None = None
    steering: torch.Tensor | None = None
    retain_weight: torch.Tensor | None = None  # [B, S] token weights of the retain loss (TRACE), None = 1

    @property
    def has_retain(self) -> bool:
        return self.retain_labels is not None


def _retain_term(inp: ObjectiveInputs, hp: Mapping[str, Any], out: dict[str, torch.Tensor]) -> torch.Tensor:
    """alpha * L_retain (NLL or KL to the reference), or 0 without retain data."""
    if not inp.has_retain:
        return torch.zeros((), device=inp.forget_labels.device)
    kind = hp.get("retain_loss", "nll")
    if kind == "nll":
        term = mean_nll(inp.retain_logits, inp.retain_labels, inp.retain_weight)
    elif kind == "kl":
        term = kl_to_reference(inp.retain_logits, inp.retain_ref_logits, inp.retain_labels, inp.retain_weight)
    else:
        raise BadInputError(f"retain_loss must be 'nll' or 'kl', got {kind!r}")
    out[f"retain_{kind}"] = term.detach()
    return hp["alpha"] * term


# -- the methods -------------------------------------------------------------------------------


def ga_loss(inp: ObjectiveInputs, hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Gradient ascent: L = -CE(forget)."""
    ce = mean_nll(inp.forget_logits, inp.forget_labels)
    return {"loss": -ce, "forget_nll": ce.detach()}


def graddiff_loss(inp: ObjectiveInputs, hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Gradient difference: L = -gamma * CE(forget) + alpha * L_retain (NLL or KL)."""
    ce = mean_nll(inp.forget_logits, inp.forget_labels)
    out = {"forget_nll": ce.detach()}
    out["loss"] = -hp["gamma"] * ce + _retain_term(inp, hp, out)
    return out


def npo_loss(inp: ObjectiveInputs, hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """NPO: L_f = -(2/beta) mean log sigmoid(-beta (logp_theta - logp_ref)), sequence-level sums;
    L = gamma * L_f + alpha * L_retain."""
    nll_sum, _ = sequence_nll(inp.forget_logits, inp.forget_labels)
    log_ratio = -nll_sum - inp.forget_ref_logp.to(nll_sum)
    lf = -(2.0 / hp["beta"]) * F.logsigmoid(-hp["beta"] * log_ratio).mean()
    out = {"npo": lf.detach(), "forget_nll": (nll_sum.sum() / _count(inp.forget_labels)).detach()}
    out["loss"] = hp["gamma"] * lf + _retain_term(inp, hp, out)
    return out


def simnpo_loss(inp: ObjectiveInputs, hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """SimNPO: L_f = -(2/beta) mean log sigmoid(beta (NLL_sum/|y| - delta)), no reference model;
    L = gamma * L_f + alpha * L_retain."""
    nll_sum, n = sequence_nll(inp.forget_logits, inp.forget_labels)
    per_tok = nll_sum / n.clamp_min(1)
    lf = -(2.0 / hp["beta"]) * F.logsigmoid(hp["beta"] * (per_tok - hp["delta"])).mean()
    out = {"simnpo": lf.detach(), "forget_nll": (nll_sum.sum() / _count(inp.forget_labels)).detach()}
    out["loss"] = hp["gamma"] * lf + _retain_term(inp, hp, out)
    return out


def rmu_loss(inp: ObjectiveInputs, hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """RMU: L_f = MSE(h_theta, c u) on forget, L_r = MSE(h_theta, h_ref) on retain, real tokens
    only, mean over tokens and hidden dims (as WMDP's code does with F.mse_loss);
    L = L_f + alpha * L_r."""
    lf = masked_mse(inp.forget_hidden, inp.steering.expand_as(inp.forget_hidden), inp.forget_mask)
    out = {"rmu_forget": lf.detach()}
    loss = lf
    if inp.has_retain:
        lr = masked_mse(inp.retain_hidden, inp.retain_ref_hidden, inp.retain_mask, inp.retain_weight)
        out["rmu_retain"] = lr.detach()
        loss = loss + hp["alpha"] * lr
    out["loss"] = loss
    return out


def eul_loss(inp: ObjectiveInputs, hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """EUL's selective teacher-student objective (Chen and Yang, EMNLP 2023), teacher = the original
    model F, student = the model being unlearned F_u, on scored (answer) positions:
        L = alpha * KL(F || F_u)[retain] - gamma * KL(F || F_u)[forget] + task_weight * CE(retain).
    The forget term pushes the student's next-token distribution away from what the original
    predicted on forget data; the retain KL keeps it where the original was elsewhere; the task
    loss keeps retain answers likely. The forget KL is unbounded above: gradient clipping (on by
    default, max_grad_norm 1.0) and the step count bound how far it goes."""
    kl_f = kl_to_reference(inp.forget_logits, inp.forget_ref_logits, inp.forget_labels)
    kl_r = kl_to_reference(inp.retain_logits, inp.retain_ref_logits, inp.retain_labels, inp.retain_weight)
    task = mean_nll(inp.retain_logits, inp.retain_labels, inp.retain_weight)
    loss = hp["alpha"] * kl_r - hp["gamma"] * kl_f + hp["task_weight"] * task
    return {"loss": loss, "forget_kl": kl_f.detach(), "retain_kl": kl_r.detach(), "retain_nll": task.detach()}


def _count(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE).sum().clamp_min(1)


# -- registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """A registered method: its loss, default hyperparameters and what the engine must provide.

    forget_reference: "logp" = sequence log-probs of the original model on forget batches (cached
      once); "logits" = the original model's logits on the step's forget batch (recomputed per step
      with the original weights swapped in: caching [B, S, V] for every batch costs too much memory).
    retain_logits: the loss always reads the original model's retain logits (a KL on retain),
      whatever hp["retain_loss"] says.
    retain_reference: "logits" (KL) or "hidden" (RMU) on retain batches, from the original model.
    needs_logits: False for representation methods (RMU): the engine may stop at the RMU layer.
    reads_hidden: the loss reads the output of one decoder layer (hp["layer"]) and a fixed steering
      direction (RMU); the engine provides forget/retain hidden states and the original model's.
    """

    name: str
    loss: Callable[[ObjectiveInputs, Mapping[str, Any]], dict[str, torch.Tensor]]
    defaults: dict[str, Any] = field(default_factory=dict)
    requires_retain: bool = False
    forget_reference: str | None = None
    needs_logits: bool = True
    reads_hidden: bool = False
    retain_logits: bool = False

    def hparams(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with `overrides`; unknown names are an error (typos must not pass silently)."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise BadInputError(f"{self.name}: unknown hyperparameters {sorted(unknown)}; "
                                f"valid: {sorted(self.defaults)}")
        hp = {**self.defaults, **overrides}
        for name, value in hp.items():
            _check_hparam(f"{self.name} hyperparameter {name}", name, value)
        return hp

    def uses_retain(self, hp: Mapping[str, Any]) -> bool:
        """Whether a step runs the paired retain batch (when retain data is given)."""
        return self.requires_retain or self.reads_hidden or bool(hp.get("alpha", 0))

    def retain_reference(self, hp: Mapping[str, Any]) -> str | None:
        if self.reads_hidden:
            return "hidden"
        return "logits" if self.retain_logits or hp.get("retain_loss") == "kl" else None


OBJECTIVES: dict[str, Objective] = {
    "ga": Objective("ga", ga_loss),
    "graddiff": Objective("graddiff", graddiff_loss, dict(gamma=1.0, alpha=1.0, retain_loss="nll"),
                          requires_retain=True),
    "npo": Objective("npo", npo_loss, dict(beta=0.1, gamma=1.0, alpha=1.0, retain_loss="nll"),
                     forget_reference="logp"),
    "simnpo": Objective("simnpo", simnpo_loss, dict(beta=4.5, delta=0.0, gamma=0.125, alpha=1.0,
                                                    retain_loss="nll")),
    "eul": Objective("eul", eul_loss, dict(gamma=1.0, alpha=1.0, task_weight=1.0), requires_retain=True,
                     forget_reference="logits", retain_logits=True),
    "rmu": Objective("rmu", rmu_loss, dict(steering_coeff=6.5, alpha=1.0, layer=None), needs_logits=False,
                     reads_hidden=True),
}


# the valid values of each hyperparameter: beta divides (must be > 0), weights must not flip sign
_POSITIVE = {"beta", "steering_coeff"}
_NON_NEGATIVE = {"gamma", "alpha", "task_weight"}
_FINITE = {"delta"}


def _check_hparam(label: str, name: str, value: Any) -> None:
    from moe_unlearn.validate import check_choice, check_int, check_number

    if name in _POSITIVE:
        check_number(label, value, low=0.0, low_open=True)
    elif name in _NON_NEGATIVE:
        check_number(label, value, low=0.0)
    elif name in _FINITE:
        check_number(label, value)
    elif name == "retain_loss":
        check_choice(label, value, ("nll", "kl"))
    elif name == "layer" and value is not None:
        check_int(label, value, low=0)


def get_objective(name: str) -> Objective:
    obj = OBJECTIVES.get(name)
    if obj is None:
        raise BadInputError(f"unknown unlearning method {name!r}; valid methods: {', '.join(sorted(OBJECTIVES))}")
    return obj


def rmu_steering(hidden_size: int, coeff: float, *, seed: int, device=None) -> torch.Tensor:
    """c * u with u uniform in [0, 1)^H, normalised to unit length (fixed by `seed`)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=g)
    return (coeff * u / u.norm()).to(device)
