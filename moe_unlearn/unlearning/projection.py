"""Retain-preserving projections of the parameter change, applied after every optimizer step.

Both keep what the model computes on retain tokens while the forget objective trains:

- GRIP (Zhu et al. 2026, "router manipulation shortcut"), `router_projection="grip"`: for each
  trained router W [E, H] with retain inputs X_r [n, H] (the hidden states entering it) and U an
  orthonormal basis of span(X_r) (top eigenvectors of X_r^T X_r up to the energy fraction
  `projection_energy`), the change from the original W0 is replaced after each step by
  dW (I - U U^T). Then W x = W0 x for every retain input x in the kept span, so retain routing
  cannot move; forgetting must come from the experts, not from routing around them. The
  parameter change is projected, not the gradient: Adam's per-element scaling would turn a
  projected gradient into an unprojected step. A router bias (GPT-OSS) is kept at its original
  value (it shifts every token's logits alike).
- Retain-null-space experts (ours, in the spirit of AlphaEdit's null-space edits),
  `expert_projection="retain_null"`: for each trained expert e, X_e = the retain inputs routed to
  e and A_e = their intermediate activations act(gate x) * (up x). Changes of gate/up [I, H] are
  projected off span(X_e), changes of down [H, I] off span(A_e); expert biases keep their
  original values. Retain tokens routed to e (inside the kept span) then get exactly their
  original expert output, which removes the mechanism by which one-expert unlearning hurts the
  retain tokens that share the expert; forgetting can only use directions outside the retain span.

With energy < 1 the invariance is approximate: retain outputs drift in proportion to the energy
left out. With energy 1.0 (or retain inputs of low rank) it is exact to float tolerance.
`Projector.report()` gives, per projected matrix, its dimension, the kept rank and energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_unlearn.arch import MoELayer, RoutingCapture
from moe_unlearn.errors import BadInputError
from moe_unlearn.registry import Choice, registry_of
from moe_unlearn.training import TrainHooks
from moe_unlearn.unlearning.tensor import TrainedTensor

ROUTER_PROJECTIONS = registry_of("router_projection", Choice(
    "grip", "the trained routers' change projected off the span of their retain inputs", needs_retain=True),
    plural="router projections")
EXPERT_PROJECTIONS = registry_of("expert_projection", Choice(
    "retain_null", "the trained experts' change projected off the span of the retain tokens routed to them",
    needs_retain=True, needs_targets=True), plural="expert projections")


@dataclass
class Subspace:
    """An orthonormal basis [d, k] of the protected inputs, with the energy fraction it keeps."""

    basis: torch.Tensor
    energy: float
    samples: int

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


def basis_from_gram(gram: torch.Tensor, energy: float, samples: int) -> Subspace:
    """The top eigenvectors of a Gram matrix X^T X [d, d] (fp64) covering `energy` of its trace.
    energy >= 1 keeps every direction with a non-negligible eigenvalue (the whole span)."""
    evals, evecs = torch.linalg.eigh(gram.double())
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    total = float(evals.sum())
    if total <= 0:
        return Subspace(torch.zeros(gram.shape[0], 0), 1.0, samples)
    if energy >= 1.0:
        k = int((evals > evals[0] * 1e-10).sum())
    else:
        k = int(torch.searchsorted(torch.cumsum(evals, 0) / total, torch.tensor(energy, dtype=torch.float64))) + 1
        k = min(k, int((evals > 0).sum()))
    kept = float(evals[:k].sum()) / total
    return Subspace(evecs[:, :k].float().contiguous(), kept, samples)


@torch.no_grad()
def _project_rows(weight: torch.Tensor, original: torch.Tensor, basis: torch.Tensor) -> None:
    """weight <- original + dW (I - U U^T), dW = weight - original; rows of weight are [.., d]."""
    if basis.shape[1] == 0:
        return
    u = basis.to(weight.device)
    delta = weight.float() - original.float()
    delta = delta - (delta @ u) @ u.T
    weight.copy_((original.float() + delta).to(weight.dtype))


class _Grams:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        if x.numel() == 0:
            self.sums.setdefault(key, torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64))
            self.counts.setdefault(key, 0)
            return
        g = (x.double().T @ x.double()).cpu()
        self.sums[key] = self.sums[key] + g if key in self.sums else g
        self.counts[key] = self.counts.get(key, 0) + int(x.shape[0])


class Projector(TrainHooks):
    """Projects the trained routers' and expert slices' changes after every step (see the module
    docstring). Runs after SliceParams wrote the shadows into the model, then copies the projected
    slices back into the shadows so the optimizer's leaves and the model agree."""

    def __init__(self, routers: list[tuple[MoELayer, list[tuple[str, nn.Parameter]], Subspace]],
                 experts: list[tuple[MoELayer, int, Subspace, Subspace]], slices=None) -> None:
        self.routers = routers
        self.experts = experts
        self.slices = slices
        self._router_orig = [[p.detach().clone() for _, p in params] for _, params, _ in routers]
        self._expert_orig = [{k: v.detach().clone() for k, v in layer.get_expert(e).items()}
                             for layer, e, _, _ in experts]

    @torch.no_grad()
    def project(self) -> None:
        lowrank = getattr(self.slices, "find", None)  # low-rank adapters: project the factor A instead
        for (_, params, sub), origs in zip(self.routers, self._router_orig, strict=True):
            for (name, p), orig in zip(params, origs, strict=True):
                item = lowrank(TrainedTensor(name)) if lowrank else None
                if item is not None:
                    self.slices.project_input(item, sub.basis)
                elif p.dim() == 2:
                    _project_rows(p.data, orig, sub.basis)
                else:  # a router bias: kept at its original value
                    p.data.copy_(orig)
        for (layer, e, sub_x, sub_a), origs in zip(self.experts, self._expert_orig, strict=True):
            skip: set[str] = set()
            for sl in layer.expert_slices(e) if lowrank else []:
                item = lowrank(TrainedTensor.of_slice(sl))
                if item is not None:
                    self.slices.project_input(item, (sub_a if sl.role == "down" else sub_x).basis)
                    skip |= {"gate", "up"} if sl.role == "gate_up" else {sl.role}
            views = layer.get_expert(e)
            for role, view in views.items():
                if role in skip:
                    continue
                if role in ("gate", "up"):
                    _project_rows(view, origs[role], sub_x.basis)
                elif role == "down":
                    _project_rows(view, origs[role], sub_a.basis)
                else:  # biases shift every routed token alike: kept
                    view.copy_(origs[role])
        if self.slices is not None:
            self.slices.read_back()

    def after_step(self, step: int) -> None:
        self.project()

    def after_resume(self, step: int) -> None:
        self.project()

    def report(self) -> list[dict]:
        out = []
        for layer, _, sub in self.routers:
            out.append({"matrix": f"router {layer.layer_idx}", "dim": int(sub.basis.shape[0]), "rank": sub.rank,
                        "energy": round(sub.energy, 6), "samples": sub.samples})
        for layer, e, sx, sa in self.experts:
            for what, sub in (("gate/up inputs", sx), ("down inputs (intermediate)", sa)):
                out.append({"matrix": f"expert {layer.layer_idx}:{e} {what}", "dim": int(sub.basis.shape[0]),
                            "rank": sub.rank, "energy": round(sub.energy, 6), "samples": sub.samples})
        return out


@torch.no_grad()
def input_grams(model: nn.Module, batches: list[dict[str, torch.Tensor]], *, router_layers: list[MoELayer],
                experts: list[tuple[MoELayer, int]], device: torch.device) -> _Grams:
    """Gram matrices X^T X (fp64, CPU) of what the given routers and experts read on `batches`, with
    the model's current weights: "router/<L>" every token's hidden state entering layer L;
    "x/<L>/<e>" the hidden states of the tokens routed to expert e (its gate/up inputs);
    "a/<L>/<e>" their intermediate activations act(gate x) * (up x) (its down inputs)."""
    layers = {layer.layer_idx: layer for layer in router_layers}
    layers.update({layer.layer_idx: layer for layer, _ in experts})
    router_idx = {layer.layer_idx for layer in router_layers}
    grams = _Grams()
    with RoutingCapture(model, list(layers.values()), hidden_states=True) as cap:
        for b in batches:
            cap.clear()
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                  use_cache=False)
            rec = cap.last
            for idx in layers:
                r = rec.layers[idx]
                mask = rec.mask.to(r.hidden.device)
                x = r.hidden[mask].float()
                if idx in router_idx:
                    grams.add(f"router/{idx}", x)
                topk = r.topk_idx[mask.to(r.topk_idx.device)]
                for lay, e in experts:
                    if lay.layer_idx != idx:
                        continue
                    xe = x[(topk == e).any(-1).to(x.device)]
                    grams.add(f"x/{idx}/{e}", xe)
                    w = lay.get_expert(e)
                    a = lay.activation(nn.functional.linear(xe, w["gate"].float(), _f(w.get("gate_bias"))),
                                        nn.functional.linear(xe, w["up"].float(), _f(w.get("up_bias"))))
                    grams.add(f"a/{idx}/{e}", a)
    return grams


@torch.no_grad()
def build_projector(model: nn.Module, retain_batches: list[dict[str, torch.Tensor]], *,
                    router_layers: list[MoELayer], experts: list[tuple[MoELayer, int]], energy: float,
                    device: torch.device, slices=None) -> Projector:
    """Collect the retain statistics with the original weights (one pass over the retain batches)
    and build the projector for `router_layers` (GRIP) and `experts` (retain-null)."""
    if not 0.0 < energy <= 1.0:
        raise BadInputError(f"projection_energy must be in (0, 1], got {energy!r}")
    grams = input_grams(model, retain_batches, router_layers=router_layers, experts=experts, device=device)

    def sub(key: str, dim: int) -> Subspace:
        if key not in grams.sums:
            return Subspace(torch.zeros(dim, 0), 1.0, 0)
        return basis_from_gram(grams.sums[key], energy, grams.counts[key])

    routers = []
    for layer in router_layers:
        params = layer.router_parameters()
        dim = next(p.shape[1] for _, p in params if p.dim() == 2)
        routers.append((layer, params, sub(f"router/{layer.layer_idx}", dim)))
    exps = []
    for layer, e in experts:
        w = layer.get_expert(e)
        exps.append((layer, e, sub(f"x/{layer.layer_idx}/{e}", w["gate"].shape[1]),
                     sub(f"a/{layer.layer_idx}/{e}", w["down"].shape[1])))
    return Projector(routers, exps, slices)


def _f(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


__all__ = ["EXPERT_PROJECTIONS", "ROUTER_PROJECTIONS", "Projector", "Subspace", "basis_from_gram",
           "build_projector", "input_grams"]
