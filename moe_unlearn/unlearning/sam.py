"""Sharpness-aware unlearning (sam_rho > 0): the forget loss is minimised at its worst nearby point.

Fan et al. (arXiv 2502.05374) make unlearning robust to relearning by smoothing the forget loss
landscape: min over theta of max over ||eps|| <= rho of L_f(theta + eps), plus the retain loss at
theta. The inner max is taken to first order, as SAM does: eps = rho * g / ||g|| with g the gradient
of L_f at theta over the *trained* tensors only (expert slices, trained whole tensors; the norm is
over all of them together). A step then costs one extra forward and backward of the forget batch
(at theta + eps) and one extra backward (for g):

    step gradient = grad L_f(theta + eps) + grad (L - L_f)(theta)

where L is the objective with its retain term, L_f the same objective without retain inputs. The
returned loss has this gradient and the value L(theta) (what is logged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.unlearning.tensor import TrainedTensor


def sam_forget_gradient(model: nn.Module, tensors: Sequence[TrainedTensor], forget_loss_at_theta: torch.Tensor,
                        forget_loss: Callable[[], torch.Tensor], rho: float) -> list[torch.Tensor]:
    """The gradient of the forget loss at theta + eps for each trained tensor (eps = rho * g / ||g||, g
    its gradient at theta, from `forget_loss_at_theta`'s graph); `forget_loss()` recomputes it with the
    model as it is. The model's values are back at theta on return (also on error)."""
    params = canonical_parameters(model)
    leaves = [params[t.name] for t in tensors]
    g = _grads(forget_loss_at_theta, tensors, leaves, keep_graph=True)  # the step's other terms share that graph
    norm = torch.sqrt(sum((x.float() ** 2).sum().to(g[0].device) for x in g)).clamp_min(1e-12)
    views = [t.view(params) for t in tensors]  # .data views: moving them leaves the autograd graphs valid
    saved = [v.clone() for v in views]
    try:
        with torch.no_grad():
            for v, x in zip(views, g, strict=True):
                v.add_((rho * x.float() / norm.to(x.device)).to(v.dtype))
        return _grads(forget_loss(), tensors, leaves)
    finally:
        with torch.no_grad():
            for v, s in zip(views, saved, strict=True):
                v.copy_(s)


def _grads(loss: torch.Tensor, tensors: Sequence[TrainedTensor], leaves: list[nn.Parameter], *,
           keep_graph: bool = False) -> list[torch.Tensor]:
    """d loss / d each trained tensor (a slice of its parameter's gradient); zeros where it does not reach."""
    unique = list({id(p): p for p in leaves}.values())
    grads = torch.autograd.grad(loss, unique, allow_unused=True, retain_graph=keep_graph)
    by_id = {id(p): (g if g is not None else torch.zeros_like(p)) for p, g in zip(unique, grads, strict=True)}
    return [t.narrow(by_id[id(p)]).detach() for t, p in zip(tensors, leaves, strict=True)]


def linear_term(model: nn.Module, tensors: Sequence[TrainedTensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_t <grads_t, w_t> - its value: zero, with gradient `grads` on the trained tensors."""
    params = canonical_parameters(model)
    dot = sum((t.narrow(params[t.name]) * g.to(params[t.name].dtype)).sum().float()
              for t, g in zip(tensors, grads, strict=True))
    return dot - dot.detach()


__all__ = ["linear_term", "sam_forget_gradient"]
