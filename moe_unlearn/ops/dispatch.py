"""Backend choice for the ops: CUDA extension, Triton or torch, decided per call.

Rules:
- `backend=` (kwarg) wins, else the environment variable MOE_UNLEARN_BACKEND
  (torch | triton | cuda; empty or "auto" = choose automatically).
- Automatic choice: on a CUDA tensor the first backend of AUTO_PREFERENCE[op] that is
  built/importable and supports the call, else torch. On a CPU tensor always torch
  (Triton on the CPU is the slow interpreter, useful only for tests). The CUDA extension is
  not in AUTO_PREFERENCE: it holds only a loramoe_delta forward in plain fp32 FMA (no routing_stats),
  never measured faster than Triton, so it runs only when asked for by name.
- Triton on a CUDA tensor needs compiled kernels: under TRITON_INTERPRET=1 the kernels were
  decorated for the interpreter and would run on CPU copies, so that is refused, not done.
- An explicitly requested backend that cannot run raises BackendUnavailable: a
  silent fallback could change results (other rounding, other tie-breaking).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence

import torch

from moe_unlearn.errors import BackendUnavailable, BadInputError

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "MOE_UNLEARN_BACKEND"
# Compiled backends tried, in order, by the automatic choice on CUDA tensors. Change an entry only with a
# benchmark (benchmarks/bench_ops.py on the GPU) that shows the other backend faster for that op.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {"routing_stats": ("triton",), "loramoe_delta": ("triton",)}


def requested_backend(backend: str | None = None) -> str | None:
    """The explicitly requested backend (kwarg first, then the environment), or None for automatic."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "")
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        source = "backend=" if backend is not None else f"${ENV_VAR}"
        raise BadInputError(f"{source} must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


@functools.cache
def cuda_extension():
    """The compiled moe_unlearn._C module, or None where it was not built (CPU torch, no nvcc)."""
    try:
        return importlib.import_module("moe_unlearn._C")
    except Exception:
        return None


def _why_not(name: str, op: str, device: torch.device, cuda_ops: Sequence[str]) -> str | None:
    """None if backend `name` can run `op` on `device`, else the reason (said to the user)."""
    if name == "torch":
        return None
    if name == "triton":
        if not triton_importable():
            return "triton is not importable; install triton (Linux) or use backend='torch'"
        if device.type == "cuda":
            if triton_interpreting():
                return ("TRITON_INTERPRET=1 is set, so the kernels are the CPU interpreter's; unset it before "
                        "importing moe_unlearn to run compiled kernels on CUDA tensors")
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (f"Triton cannot run on a {device.type} tensor; on the CPU set TRITON_INTERPRET=1 before "
                "importing moe_unlearn (slow, for tests) or use backend='torch'")
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got a {device.type} tensor; use backend='torch'"
    ext = cuda_extension()
    if ext is None:
        return ("the CUDA extension moe_unlearn._C is not built; reinstall on a machine with a CUDA torch "
                "and nvcc (MOE_UNLEARN_CUDA_EXT=1 pip install -e . --no-build-isolation) or use backend='triton'")
    if op not in cuda_ops:
        return f"the CUDA extension has no {op!r} for this call; use backend='triton' or 'torch'"
    return None


def choose_backend(
    op: str,
    device: torch.device,
    *,
    backend: str | None = None,
    preference: Sequence[str] | None = None,
    cuda_ops: Sequence[str] = (),
    unsupported: dict[str, str] | None = None,
) -> str:
    """Pick the backend for one call of `op` on tensors living on `device`.

    `preference`: the compiled backends to try in order on a CUDA device (default AUTO_PREFERENCE[op]).
    `cuda_ops`: the names this call can use from the CUDA extension (empty = none).
    `unsupported`: backend -> reason, for arguments a backend does not handle in this call.
    """
    unsupported = unsupported or {}
    wanted = requested_backend(backend)
    if wanted is not None:
        reason = unsupported.get(wanted) or _why_not(wanted, op, device, cuda_ops)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {wanted!r} was requested but cannot run: {reason}")
        return wanted
    if device.type != "cuda":
        return "torch"
    if preference is None:
        preference = AUTO_PREFERENCE.get(op, ("triton",))
    for name in preference:
        if name not in unsupported and _why_not(name, op, device, cuda_ops) is None:
            return name
    return "torch"
