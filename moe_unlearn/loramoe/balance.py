"""The localized balancing constraint (LBC) of LoRAMoE and the context that feeds it.

Per-sample type labels reach the layers without patching transformers: the training
step wraps its forward pass in `routing_context(model, mask=..., types=...)`, which sets
an attribute on every LoRAMoELinear; each layer then records its router probabilities
into the context. Outside a context (evaluation, `generate()`) the layers record nothing
and the LBC is simply off.

Convention (a trap of the official form, spelled out here). For expert n and sample m,
    Q[n, m] = sum over sample m's valid tokens of G(x)_n      (padding excluded)
    I[n, m] = 1 + delta if expert n's group serves sample m's type, else 1 - delta
    L_lbc   = Var(Z) / Mean(Z)^2                              (squared coefficient of variation)
The official code uses Z = I * Q. L_lbc is minimal when all Z are equal, i.e. Q ~ 1/I:
the group that serves a sample's type then gets LESS router mass, by (1-delta)/(1+delta),
the opposite of what the paper says the constraint is for. Our default, "divide", uses
    Z = Q / I,
whose optimum is Q ~ I: the matching group gets (1+delta)/(1-delta) times the mass of a
non-matching group of the same size, which is the paper's stated intent (the task group
handles task data, the world-knowledge group handles world-knowledge data). The
official form stays available as lbc_convention="official" for reproducing published runs.
Var is the unbiased variance over all (n, m) entries, as torch.var and the official code
compute it. Samples whose type no group serves (or that have no type) are left out.
With a "topk" router the LBC uses the full softmax G(x), so unselected experts still
receive the gradient that moves mass toward them. The model-level loss is the mean
of the per-layer losses, so lbc_weight does not depend on the number of wrapped layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from moe_unlearn.errors import BadInputError
from moe_unlearn.loramoe.config import CONVENTIONS

_EPS = 1e-10


def localized_balance_loss(
    gates: torch.Tensor,
    mask: torch.Tensor | None,
    sample_group: torch.Tensor,
    expert_group: torch.Tensor,
    delta: float,
    convention: str = "divide",
) -> torch.Tensor:
    """L_lbc of one layer.

    gates [B, S, E] (or [B*S, E]) router probabilities G(x); mask [B, S] (1 = real token,
    None = all real); sample_group [B] int, the group serving each sample's type, -1 = not in
    the LBC; expert_group [E] int. Returns a scalar fp32 tensor (0 when fewer than two
    entries of Z exist).
    """
    if convention not in CONVENTIONS:
        raise BadInputError(f"lbc convention must be one of {CONVENTIONS}, got {convention!r}")
    num_samples = sample_group.shape[0]
    E = gates.shape[-1]
    g = gates.float().reshape(num_samples, -1, E)
    if mask is None:
        mask = torch.ones(g.shape[:2], device=g.device)
    q = torch.einsum("bse,bs->eb", g, mask.to(g.device, torch.float32).reshape(num_samples, -1))  # [E, B]
    keep = sample_group >= 0
    q = q[:, keep]
    if q.numel() < 2:
        return gates.new_zeros((), dtype=torch.float32)
    match = expert_group.to(q.device)[:, None] == sample_group[keep].to(q.device)[None, :]
    importance = torch.where(match, 1.0 + delta, 1.0 - delta)
    z = q * importance if convention == "official" else q / importance
    return z.var() / (z.mean() ** 2 + _EPS)


class RoutingContext:
    """What the training step tells the LoRAMoE layers about the batch being run.

    mask [B, S] attention mask (padding = 0); types: one label per sample (None = untyped).
    Layers append (layer name, G [B*S, E] fp32 with graph) to `records`.
    """

    def __init__(self, mask: torch.Tensor | None, types: Sequence[str | None] | None, *,
                 group_types: Sequence[str] | None, expert_group: Sequence[int], delta: float,
                 convention: str, batch_shape: tuple[int, int] | None = None) -> None:
        if mask is not None:
            if mask.dim() != 2:
                raise BadInputError(f"routing context mask must be [batch, seq], got shape {tuple(mask.shape)}")
            batch_shape = (int(mask.shape[0]), int(mask.shape[1]))
        if batch_shape is None:
            raise BadInputError("routing context needs the attention mask [batch, seq] or batch_shape")
        self.batch_shape = batch_shape
        self.mask = mask
        if types is not None and len(types) != batch_shape[0]:
            raise BadInputError(f"got {len(types)} type labels for a batch of {batch_shape[0]} samples")
        self.types: list[str | None] = list(types) if types is not None else [None] * batch_shape[0]
        index = {t: g for g, t in enumerate(group_types or [])}
        self.sample_group = torch.tensor([index.get(t, -1) if t is not None else -1 for t in self.types],
                                         dtype=torch.long)
        self.expert_group = torch.tensor(list(expert_group), dtype=torch.long)
        self.delta = delta
        self.convention = convention
        self.records: list[tuple[str, torch.Tensor]] = []

    def record(self, layer_name: str, probs: torch.Tensor) -> None:
        """Called by a LoRAMoELinear with its [T, E] router probabilities."""
        B, S = self.batch_shape
        if probs.shape[0] != B * S:
            raise BadInputError(
                f"layer {layer_name} saw {probs.shape[0]} tokens inside a routing context for a batch of "
                f"{B}x{S}; enter the context around exactly one forward pass of that batch")
        self.records.append((layer_name, probs))

    def balance_loss(self) -> torch.Tensor:
        """Mean over the recorded layers of the per-layer LBC (0 when nothing applies)."""
        if not self.records:
            return torch.zeros(())
        losses = [localized_balance_loss(p, self.mask, self.sample_group.to(p.device),
                                         self.expert_group.to(p.device), self.delta, self.convention)
                  for _, p in self.records]
        return torch.stack(losses).mean()


@contextmanager
def routing_context(model: nn.Module, mask: torch.Tensor | None = None,
                    types: Sequence[str | None] | None = None, *,
                    batch_shape: tuple[int, int] | None = None) -> Iterator[RoutingContext]:
    """Attach a RoutingContext to every LoRAMoE layer of `model` for one forward pass.

        with routing_context(model, batch["attention_mask"], batch_types) as ctx:
            out = model(**batch)
        loss = out.loss + config.lbc_weight * ctx.balance_loss()
    """
    from moe_unlearn.loramoe.model import get_loramoe_config, loramoe_layers

    config = get_loramoe_config(model)
    layers = loramoe_layers(model)
    ctx = RoutingContext(mask, types, group_types=config.group_types, expert_group=config.expert_group(),
                         delta=config.lbc_delta, convention=config.lbc_convention, batch_shape=batch_shape)
    for layer in layers.values():
        if layer.context is not None:
            raise BadInputError("a routing context is already active on this model; contexts do not nest")
    for layer in layers.values():
        layer.context = ctx
    try:
        yield ctx
    finally:
        for layer in layers.values():
            layer.context = None
