"""Public entry points of the ops: check the inputs once, pick a backend, call it.

Backends get validated inputs, so each of them only computes. The torch references in
routing_stats.py / loramoe_delta.py are the ground truth the other backends are tested against.
"""

from __future__ import annotations

import os

import torch

from moe_unlearn.errors import BadInputError
from moe_unlearn.ops.dispatch import choose_backend
from moe_unlearn.ops.loramoe_delta import dense_gates, loramoe_delta_torch
from moe_unlearn.ops.routing_stats import SCORE_FNS, RoutingStats, routing_stats_torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise BadInputError(msg)


def _check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    _need(t.dtype in _FLOATS, f"{name} must be float32/float16/bfloat16, got {t.dtype}")


def _check_index(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
          f"{name} must be an integer tensor, got {t.dtype}")
    _need(tuple(t.shape) == shape, f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            _need(t.device == device, f"{name} is on {t.device} but the other inputs are on {device}; "
                  "move all inputs to one device")


def _check_values(seq_ids: torch.Tensor, topk_idx: torch.Tensor | None, num_seqs: int, E: int,
                  seq_sorted: bool | None) -> None:
    """Range checks of the ids (and sortedness when promised). CPU tensors, or MOE_UNLEARN_SYNC_CHECKS=1: one
    host sync and a clear BadInputError. CUDA tensors otherwise: torch._assert_async, checked on the device
    without a sync (a violation stops the CUDA context with the message below)."""
    msgs = [f"seq_ids must lie in [0, num_seqs={num_seqs})", f"seq_ids must lie in [0, num_seqs={num_seqs})"]
    checks = [seq_ids.min() >= 0, seq_ids.max() < num_seqs]
    if topk_idx is not None:
        checks += [topk_idx.min() >= 0, topk_idx.max() < E]
        msgs += [f"topk_idx values must lie in [0, E={E})"] * 2
    if seq_sorted and seq_ids.shape[0] > 1:
        checks.append((seq_ids[1:] >= seq_ids[:-1]).all())
        msgs.append("seq_sorted=True but seq_ids are not non-decreasing")
    _assert_all(checks, msgs, seq_ids.device)


def _assert_all(checks: list[torch.Tensor], msgs: list[str], device: torch.device) -> None:
    """BadInputError for the first failed check (one host sync) on CPU tensors or with
    MOE_UNLEARN_SYNC_CHECKS=1; device-side assertions without a sync on CUDA tensors."""
    if device.type != "cuda" or os.environ.get("MOE_UNLEARN_SYNC_CHECKS") == "1":
        ok = torch.stack(checks).tolist()
        for good, msg in zip(ok, msgs, strict=True):
            _need(good, msg)
        return
    for cond, msg in zip(checks, msgs, strict=True):
        torch._assert_async(cond, msg)


def routing_stats(
    logits: torch.Tensor | None,
    *,
    top_k: int,
    seq_ids: torch.Tensor,
    num_seqs: int,
    mask: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    router_weight: torch.Tensor | None = None,
    router_bias: torch.Tensor | None = None,
    score_fn: str = "softmax",
    return_topk: bool = False,
    seq_sorted: bool | None = None,
    backend: str | None = None,
) -> RoutingStats:
    """Per-expert routing statistics of one batch (see RoutingStats and routing_stats_torch for the
    contract). `backend`: None/'auto', 'torch', 'triton' or 'cuda' (else $MOE_UNLEARN_BACKEND).

    `seq_sorted`: True promises non-decreasing seq_ids (the kernels then need no sort and no host sync),
    False has them sorted, None finds out (one host sync on a GPU). Value checks of seq_ids / topk_idx raise
    BadInputError on CPU tensors; on CUDA tensors they are device-side assertions (no host sync, so the call
    stays graph-capturable), or BadInputError with MOE_UNLEARN_SYNC_CHECKS=1."""
    if logits is None:
        _need(hidden is not None and router_weight is not None,
              "routing_stats needs logits [T, E], or hidden [T, H] and router_weight [E, H]")
        _check_float("hidden", hidden, 2)
        _check_float("router_weight", router_weight, 2)
        _need(router_weight.shape[1] == hidden.shape[1],
              f"router_weight {tuple(router_weight.shape)} does not match hidden {tuple(hidden.shape)} ([E, H] vs [T, H])")
        T, E = hidden.shape[0], router_weight.shape[0]
        device = hidden.device
        if router_bias is not None:
            _check_float("router_bias", router_bias, 1)
            _need(router_bias.shape[0] == E, f"router_bias must have shape ({E},), got {tuple(router_bias.shape)}")
    else:
        _need(hidden is None and router_weight is None, "pass either logits or hidden + router_weight, not both")
        _need(router_bias is None, "router_bias only applies with hidden + router_weight; add it to the logits")
        _check_float("logits", logits, 2)
        T, E = logits.shape
        device = logits.device
    _need(E >= 1, "there must be at least one expert (E >= 1)")
    _need(score_fn in SCORE_FNS, f"score_fn must be one of {SCORE_FNS}, got {score_fn!r}")
    _need(isinstance(num_seqs, int) and num_seqs >= 0, f"num_seqs must be an int >= 0, got {num_seqs!r}")
    _check_index("seq_ids", seq_ids, (T,))
    if topk_idx is not None:
        _need(topk_idx.dim() == 2, f"topk_idx must be [T, K], got shape {tuple(topk_idx.shape)}")
        _check_index("topk_idx", topk_idx, (T, topk_idx.shape[1]))
        _need(1 <= topk_idx.shape[1] <= E, f"topk_idx has K={topk_idx.shape[1]}, must be in 1..{E}")
    else:
        _need(isinstance(top_k, int) and 1 <= top_k <= E, f"top_k must be an int in 1..{E}, got {top_k!r}")
    if mask is not None:
        _need(tuple(mask.shape) == (T,), f"mask must have shape ({T},), got {tuple(mask.shape)}")
    _same_device(device, seq_ids=seq_ids, mask=mask, topk_idx=topk_idx, router_weight=router_weight,
                 router_bias=router_bias)
    _need(seq_sorted in (None, True, False), f"seq_sorted must be None, True or False, got {seq_sorted!r}")
    if T > 0:
        _check_values(seq_ids, topk_idx, num_seqs, E, seq_sorted)

    if topk_idx is not None:
        topk_idx = topk_idx.long()
    kwargs = dict(top_k=top_k, seq_ids=seq_ids, num_seqs=num_seqs, mask=mask, topk_idx=topk_idx, hidden=hidden,
                  router_weight=router_weight, router_bias=router_bias, score_fn=score_fn, return_topk=return_topk)
    compiled_kwargs = dict(kwargs, seq_sorted=seq_sorted)
    unsupported = {}
    if E > 256:
        unsupported["triton"] = f"E={E} > 256 experts is only supported by backend='torch'"
    name = choose_backend("routing_stats", device, backend=backend, unsupported=unsupported)
    if name == "triton":
        from moe_unlearn.kernels.routing_stats import routing_stats_triton

        return routing_stats_triton(logits, **compiled_kwargs)
    return routing_stats_torch(logits, **kwargs)


# Machine balance used by the cost model: FLOPs one byte of HBM traffic buys on an H100 SXM (989 TFLOP/s dense
# bf16/fp16 tensor cores or 67 TFLOP/s fp32 without tf32, over 3.35 TB/s). The H200 (4.3 TB/s) is close enough.
FLOPS_PER_BYTE = {2: 295.0, 4: 20.0}


def routed_pays(E: int, r: int, K: int, d_in: int, d_out: int, elem_bytes: int) -> bool:
    """Whether top-K goes through the routed (sorted-by-expert) kernels rather than densified gates.

    Cost model, per token, in bytes of HBM traffic (FLOPs converted at the machine balance FLOPS_PER_BYTE):
    - routed: x gathered once per pair (K d_in), y_p written and read back in the model dtype (2 K d_out),
      the delta written once (d_out), all times the element size, plus h in fp32 (2 K r 4); its FLOPs
      (2 K r (d_in + d_out)) are negligible next to that;
    - dense (two GEMMs over the E r stacked columns): the larger of its FLOPs 2 E r (d_in + d_out) over the
      balance and its bytes (d_in + d_out) es + the [E r] intermediate written and read in fp32 (2 E r 4)
      unless the fused forward keeps it on chip (E r_pad <= 256).
    Both grow linearly in T, so the choice does not depend on T. At E=64, r=16, K=4, d=4096, bf16 the
    routed path costs ~107 KB per token against ~57 KB for dense tensor-core GEMMs: dense is taken; at
    E=128, K=2 or with fp32 (no tensor cores) the routed path wins. Measure on the GPU (bench_ops.py) before
    trusting the balance."""
    es = elem_bytes
    routed = (K * d_in + 2 * K * d_out + d_out) * es + 2 * K * r * 4
    r_pad = 1 << max(0, (r - 1).bit_length())
    h_bytes = 0 if E * r_pad <= 256 else 2 * E * r * 4
    dense = max(2 * E * r * (d_in + d_out) / FLOPS_PER_BYTE.get(es, 295.0), (d_in + d_out) * es + h_bytes)
    return routed < dense


def loramoe_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor | None = None,
    *,
    topk_idx: torch.Tensor | None = None,
    topk_weight: torch.Tensor | None = None,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """sum_e g_e(x) * scale * B_e A_e x for x [T, d_in], A [E, r, d_in], B [E, d_out, r] and dense gates
    [T, E] or top-K (topk_idx [T, K] int, topk_weight [T, K]). Returns a new [T, d_out] tensor in x's dtype,
    or, with `out` [T, d_out], adds the delta into `out` in place and returns it. Differentiable in x, A, B,
    the gates / top-K weights and `out` (every backend except 'cuda', which is forward-only)."""
    _check_float("x", x, 2)
    _check_float("A", A, 3)
    _check_float("B", B, 3)
    T, d_in = x.shape
    E, r, a_in = A.shape
    _need(a_in == d_in, f"A must be [E, r, d_in={d_in}], got {tuple(A.shape)}")
    _need(B.shape[0] == E and B.shape[2] == r, f"B must be [E={E}, d_out, r={r}], got {tuple(B.shape)}")
    _need(A.dtype == x.dtype and B.dtype == x.dtype,
          f"x, A and B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}; cast the adapter weights")
    _need(E >= 1 and r >= 1, "A needs at least one expert and rank >= 1")
    d_out = B.shape[1]
    if gates is None:
        _need(topk_idx is not None and topk_weight is not None,
              "loramoe_delta needs dense gates [T, E] or topk_idx and topk_weight [T, K]")
        _need(topk_idx.dim() == 2 and topk_idx.shape[0] == T, f"topk_idx must be [T={T}, K], got {tuple(topk_idx.shape)}")
        _check_index("topk_idx", topk_idx, tuple(topk_idx.shape))
        _check_float("topk_weight", topk_weight, 2)
        _need(topk_weight.shape == topk_idx.shape, "topk_weight must have the shape of topk_idx")
        if topk_idx.numel():
            srt = topk_idx.sort(dim=1).values
            _assert_all([srt[:, 0].min() >= 0, srt[:, -1].max() < E, (srt[:, 1:] != srt[:, :-1]).all()],
                        [f"topk_idx values must lie in [0, E={E})", f"topk_idx values must lie in [0, E={E})",
                         "topk_idx must not name an expert twice in one row"], x.device)
    else:
        _need(topk_idx is None and topk_weight is None, "pass dense gates or topk_idx/topk_weight, not both")
        _check_float("gates", gates, 2)
        _need(tuple(gates.shape) == (T, E), f"gates must be [T={T}, E={E}], got {tuple(gates.shape)}")
    if out is not None:
        _check_float("out", out, 2)
        _need(tuple(out.shape) == (T, d_out), f"out must be [T={T}, d_out={d_out}], got {tuple(out.shape)}")
    _same_device(x.device, A=A, B=B, gates=gates, topk_idx=topk_idx, topk_weight=topk_weight, out=out)

    grad_inputs = (x, A, B, gates, topk_weight, out)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    unsupported = {"cuda": "the CUDA loramoe_delta is forward-only; use backend='triton' for training"} if needs_grad else {}
    name = choose_backend("loramoe_delta", x.device, backend=backend, cuda_ops=("loramoe_delta",),
                          unsupported=unsupported)
    if name == "torch":
        idx = topk_idx.long() if topk_idx is not None else None
        delta = loramoe_delta_torch(x, A, B, gates, topk_idx=idx, topk_weight=topk_weight, scale=scale)
        return delta if out is None else out.add_(delta)
    if name == "triton" and gates is None and routed_pays(E, r, topk_idx.shape[1], d_in, d_out, x.element_size()):
        from moe_unlearn.kernels.loramoe_routed import loramoe_delta_routed_triton

        return loramoe_delta_routed_triton(x, A, B, topk_idx, topk_weight, scale=scale, out=out)
    if gates is None:
        # Top-K becomes dense gates through torch's scatter, so weight gradients come from its autograd.
        gates = dense_gates(E, topk_idx.long(), topk_weight)
    if name == "triton":
        from moe_unlearn.kernels.loramoe_delta import loramoe_delta_triton

        return loramoe_delta_triton(x, A, B, gates, scale=scale, out=out)
    from moe_unlearn.ops.cuda_backend import loramoe_delta_cuda

    return loramoe_delta_cuda(x, A, B, gates, scale=scale, out=out)
