"""Low-rank unlearning adapters: train W = W0 + B A on an expert's matrices instead of W itself.

`unlearn(..., adapter="lora", adapter_rank=r)` keeps every trained expert matrix W0 [out, in] of
the scope frozen and trains two factors, A [r, in] (random, std 1/sqrt(r)) and B [out, r] (zero,
so training starts at the original model). The model's fused expert tensors hold W0 + B A at
every step, so the forward pass, the objectives, the router anchor and the prefix cache are
those of full-slice training; only the gradient changes: the fused tensor's gradient slice G
(dL/dW) becomes dL/dA = B^T G and dL/dB = G A^T (exact chain rule). The optimizer state is
that of r (in + out) numbers per matrix instead of in x out, and the patch stores the factors.

What trains low-rank: every 2-D matrix of the scope's expert slices (gate_up / gate / up / down),
and the routers too with `adapter_router=True`; 1-D tensors (biases) and whole tensors (routers by
default: E x H, already small; shared experts) train in full as before and are stored as values.

Bit-exactness. W0 + B A is computed by one fixed elementwise recipe (`lowrank_apply`): the outer
products b_j a_j^T of the fp32 factors, each exact in float64, summed in order j = 0..r-1 in
float64, added to W0 in float64 and rounded once to the model dtype. Elementwise IEEE operations
give the same bits on every device, so applying a patch reproduces the trained weights exactly
(checked against the stored sha256). The inverse, round(W_new - B A), recovers W0 except where
the rounding of the forward step crossed a binade; those few elements are stored with the patch
(`fix_index` / `fix_value`), so revert is bit-exact too.

Fusion (`moe_unlearn.unlearning.fusion`) needs, per matrix, the Gram matrix X^T X of the inputs
the matrix saw while a request was unlearned (EUL's regression merge). They are measured on the
original model before training: for an expert's gate/up, the hidden states of the tokens routed
to it; for its down projection, those tokens' intermediate activations; for a router, every
token's hidden state; forget and retain data separately. Each Gram is stored as a factor
F [in, k] with F F^T = X^T X, its top k <= adapter_gram_rank eigendirections (the energy kept is
recorded), so the statistics stay small for a wide expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_unlearn.arch.base import ExpertSlice, MoELayer
from moe_unlearn.registry import Choice, registry_of
from moe_unlearn.training import TrainHooks
from moe_unlearn.unlearning.scopes import SliceParams, accumulate_grad
from moe_unlearn.unlearning.tensor import Key, TrainedTensor

ADAPTERS = registry_of("adapter", Choice("lora", "W0 + B A of rank adapter_rank on each expert matrix"))


# -- the matrix of a slice ---------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixLayout:
    """How a trained tensor (an expert slice or a whole parameter) is one matrix [out, in]:
    squeeze = the size-1 axis to drop (the expert axis of a fused [E, ., .] tensor), or None;
    in_axis = the axis (0 or 1, after squeezing) that multiplies the inputs."""

    squeeze: int | None
    in_axis: int

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The [out, in] view (no copy) of `t`."""
        m = t.squeeze(self.squeeze) if self.squeeze is not None else t
        return m if self.in_axis == 1 else m.T

    def to_dict(self) -> dict[str, int | None]:
        return {"squeeze": self.squeeze, "in_axis": self.in_axis}


def slice_layout(layer: MoELayer, s: ExpertSlice, expert: int) -> MatrixLayout | None:
    """The layout of expert slice `s` (None when it is no matrix: a bias). The input axis is read off
    the strides of the layer's nn.Linear-oriented views (`get_expert`), which share the slice's
    storage, so no layout is assumed per family (fused [E, 2I, H], GPT-OSS [E, H, 2I], DBRX rows)."""
    v = s.view()
    squeeze = None
    if v.dim() == 3 and v.shape[s.dim] == 1:
        squeeze, v = s.dim, v.squeeze(s.dim)
    if v.dim() != 2:
        return None
    views = layer.get_expert(expert)
    ref = views.get("gate" if s.role == "gate_up" else s.role)
    if ref is None or ref.dim() != 2:
        return None
    s_in = ref.stride(1)
    if v.stride(1) == s_in and v.stride(0) != s_in:
        in_axis = 1
    elif v.stride(0) == s_in and v.stride(1) != s_in:
        in_axis = 0
    else:  # strides do not tell (a size-1 axis): the axis whose size is the view's input size
        in_axis = 1 if v.shape[1] == ref.shape[1] else 0
    return MatrixLayout(squeeze, in_axis)


def router_layout(p: nn.Parameter, hidden_size: int) -> MatrixLayout | None:
    """A 2-D router weight: [E, H] (nn.Linear) or [H, E]."""
    if p.dim() != 2:
        return None
    return MatrixLayout(None, 1 if p.shape[1] == hidden_size else 0)


# -- the exact recipes ---------------------------------------------------------------------------


def lowrank_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B A [out, in] in float64 by a fixed elementwise order (same bits on every device): each outer
    product of fp32 factors is exact in float64; they are summed j = 0, 1, ... r-1."""
    a64, b64 = a.double(), b.double()
    acc = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64, device=a.device)
    for j in range(a.shape[0]):
        acc += b64[:, j:j + 1] * a64[j:j + 1, :]
    return acc


def lowrank_apply(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """round_to_dtype(W0 + B A): the value a low-rank entry holds ([out, in], W0's dtype)."""
    return (w0.double() + lowrank_delta(a.to(w0.device), b.to(w0.device))).to(w0.dtype)


def lowrank_unapply(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """round_to_dtype(W - B A): W0 except at the elements `revert_fixes` records."""
    return (w.double() - lowrank_delta(a.to(w.device), b.to(w.device))).to(w.dtype)


def lowrank_value(base: torch.Tensor, layout: MatrixLayout, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `base` (an entry's tensor, its own shape) whose matrix holds lowrank_apply(W0, a, b)."""
    out = base.detach().cpu().clone()
    layout.matrix(out).copy_(lowrank_apply(layout.matrix(base.detach().cpu()), a, b))
    return out


_INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(_INT_OF[t.element_size()]).reshape(-1)


def revert_fixes(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices [n] (int32 where they fit), original values [n]) of the [out, in] elements where
    lowrank_unapply(lowrank_apply(W0)) differs from W0 in any bit (CPU tensors)."""
    w0 = w0.detach().cpu()
    back = lowrank_unapply(lowrank_apply(w0, a.cpu(), b.cpu()), a.cpu(), b.cpu())
    idx = torch.nonzero(_bits(back) != _bits(w0)).reshape(-1)
    values = w0.contiguous().reshape(-1)[idx].clone()
    return idx.to(torch.int32 if w0.numel() < 2**31 else torch.int64), values


def lowrank_revert(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fix_index: torch.Tensor,
                   fix_value: torch.Tensor) -> torch.Tensor:
    """W0 from W = lowrank_apply(W0, a, b), bit-exactly ([out, in], contiguous)."""
    back = lowrank_unapply(w, a, b).contiguous()
    flat = back.view(-1)
    if fix_index.numel():
        flat[fix_index.to(flat.device, torch.int64)] = fix_value.to(flat.device, flat.dtype)
    return back


# -- training ------------------------------------------------------------------------------------


@dataclass
class LowRankItem:
    """One matrix trained as W0 + B A: a whole parameter or an expert slice of it (`tensor`)."""

    tensor: TrainedTensor
    param: nn.Parameter
    layout: MatrixLayout
    w0: torch.Tensor  # [out, in] copy of the original matrix, model dtype
    a: nn.Parameter  # [r, in] fp32
    b: nn.Parameter  # [out, r] fp32

    @property
    def name(self) -> str:
        return self.tensor.name

    def view(self) -> torch.Tensor:
        """The model's [out, in] view of the matrix (writing it writes the model)."""
        return self.layout.matrix(self.tensor.narrow(self.param.data))

    def grad(self) -> torch.Tensor:
        return self.layout.matrix(self.tensor.narrow(self.param.grad))

    @property
    def key(self) -> Key:
        return self.tensor.key


def _check_rank(matrices: list[tuple], rank: int) -> None:
    """Before any factor is allocated: a rank above a matrix's smaller side adds nothing (B A already spans
    every matrix of that shape), so it is refused, and so is a total the device has no memory for."""
    from moe_unlearn.errors import BadInputError
    from moe_unlearn.validate import check_allocation

    nbytes = 0
    for tensor, param, layout in matrices:
        out_f, in_f = layout.matrix(tensor.narrow(param.data)).shape
        if rank > min(out_f, in_f):
            raise BadInputError(f"adapter_rank {rank} exceeds the smaller side of {tensor.name} ({out_f} x {in_f}); a rank "
                                f"above {min(out_f, in_f)} adds nothing, train the slice in full (adapter=None) instead")
        nbytes += 4 * rank * (in_f + out_f) * 4  # factors, their gradients and two Adam moments, fp32
    if matrices:
        check_allocation("the low-rank adapters", nbytes, matrices[0][1].device)


class AdapterParams(TrainHooks):
    """The leaves of a low-rank run: factors A, B per matrix, plus `SliceParams` (shadows / masters)
    for what trains in full; pass `.leaves` to `train` and this object as a hook (module docstring).

    matrices: (trained tensor, its parameter, layout) of every matrix trained low-rank; slices and
    whole: the rest of the scope, trained in full. The A factors are drawn from `seed`."""

    def __init__(self, matrices: list[tuple[TrainedTensor, nn.Parameter, MatrixLayout]],
                 slices: list[ExpertSlice], whole: list[tuple[str, nn.Parameter]], *, rank: int, seed: int) -> None:
        self.rank = rank
        self.values = SliceParams(slices, whole)
        full_params = {id(s.param) for s in slices} | {id(p) for _, p in whole}
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7) % 2**63)
        _check_rank(matrices, rank)
        self.items: list[LowRankItem] = []
        for tensor, param, layout in matrices:
            if id(param) in full_params:
                raise ValueError(f"{tensor.name} holds both a low-rank matrix and a fully trained part")
            view = layout.matrix(tensor.narrow(param.data))
            out_f, in_f = view.shape
            a = torch.randn(rank, in_f, generator=gen, dtype=torch.float32) / rank ** 0.5
            self.items.append(LowRankItem(tensor, param, layout, view.detach().clone(),
                                          nn.Parameter(a.to(param.device)),
                                          nn.Parameter(torch.zeros(out_f, rank, device=param.device))))
        self._by_key = {it.key: it for it in self.items}
        self._handles = []
        by_param: dict[int, list[LowRankItem]] = {}
        for it in self.items:
            by_param.setdefault(id(it.param), []).append(it)
        for group in by_param.values():
            group[0].param.requires_grad_(True)
            self._handles.append(group[0].param.register_post_accumulate_grad_hook(self._hook(group)))
        self.leaves: list[nn.Parameter] = self.values.leaves + [t for it in self.items for t in (it.a, it.b)]

    @staticmethod
    def _hook(group: list[LowRankItem]):
        def hook(param: torch.Tensor) -> None:
            for it in group:
                g = it.grad().float()
                accumulate_grad(it.a, it.b.detach().T @ g)
                accumulate_grad(it.b, g @ it.a.detach().T)
            param.grad = None
        return hook

    def find(self, tensor: TrainedTensor) -> LowRankItem | None:
        """The low-rank item of `tensor`, None when it trains in full (or not at all)."""
        return self._by_key.get(tensor.key)

    @torch.no_grad()
    def write_back(self) -> None:
        for it in self.items:
            it.view().copy_(lowrank_apply(it.w0, it.a.detach(), it.b.detach()))
        self.values.write_back()

    @torch.no_grad()
    def read_back(self) -> None:
        """Only the fully trained part takes in-place changes; low-rank items are projected through
        `project_input` (their model values are always lowrank_apply of the factors)."""
        self.values.read_back()

    @torch.no_grad()
    def project_input(self, item: LowRankItem, basis: torch.Tensor) -> None:
        """B A <- B A (I - U U^T): the change projected off span(U) of the inputs, done on A (rank kept)."""
        if basis.shape[1] == 0:
            return
        u = basis.to(item.a.device, torch.float32)
        item.a.sub_((item.a @ u) @ u.T)
        item.view().copy_(lowrank_apply(item.w0, item.a.detach(), item.b.detach()))

    def after_step(self, step: int) -> None:
        self.write_back()

    def after_resume(self, step: int) -> None:
        self.write_back()

    def factors(self) -> dict[Key, dict[str, torch.Tensor | MatrixLayout]]:
        """{entry key: {"a", "b" (CPU fp32 copies), "layout"}}."""
        return {it.key: {"a": it.a.detach().cpu().clone(), "b": it.b.detach().cpu().clone(), "layout": it.layout}
                for it in self.items}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.leaves)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.values.close()


# -- Gram statistics -------------------------------------------------------------------------------


def gram_factor(gram: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, float]:
    """F [d, k] fp32 with F F^T = the top-k eigen part of `gram` (k <= max_rank, eigenvalues above
    1e-10 of the largest), and the share of the trace it keeps."""
    evals, evecs = torch.linalg.eigh(gram.double())
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    total = float(evals.sum())
    if total <= 0:
        return torch.zeros(gram.shape[0], 0), 1.0
    k = min(int((evals > evals[0] * 1e-10).sum()), int(max_rank))
    return (evecs[:, :k] * evals[:k].sqrt()).float().contiguous(), float(evals[:k].sum()) / total


__all__ = ["ADAPTERS", "AdapterParams", "LowRankItem", "MatrixLayout", "gram_factor", "lowrank_apply",
           "lowrank_delta", "lowrank_revert", "lowrank_unapply", "lowrank_value", "revert_fixes", "router_layout", "slice_layout"]
