"""Helpers shared by the Triton launchers: allocation, dtype policy, launch heuristics."""

from __future__ import annotations

import contextlib
import functools
import os

import torch


def interpreting() -> bool:
    """Kernels run through the Triton CPU interpreter (TRITON_INTERPRET=1, read at decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(t: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors and the interpreter CPU tensors; anything else is refused.

    Under TRITON_INTERPRET=1 a CUDA tensor would be copied to the CPU and run through the interpreter
    (slow, and Triton 3.6's interpreter fails with numpy >= 2.4), so it is an error, not a fallback."""
    if t.device.type == "cuda" and interpreting():
        raise RuntimeError("Triton kernels were decorated under TRITON_INTERPRET=1 (the CPU interpreter) but got a "
                           "CUDA tensor; unset TRITON_INTERPRET before importing moe_unlearn to run compiled kernels")
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"compiled Triton kernels need CUDA tensors, got a {t.device.type} tensor "
                           "(set TRITON_INTERPRET=1 before importing moe_unlearn to interpret them on the CPU)")


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current while launching: Triton launches on torch.cuda.current_device()'s stream,
    not on the tensor's device, so a layer placed on cuda:1 by a device_map would otherwise run on cuda:0."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer a launcher fills comes from here, uninitialised. Tests replace this
    function with one that fills NaN / garbage, which proves that no kernel reads memory it did not write."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_in_fp32(*dtypes: torch.dtype) -> bool:
    """Whether tl.dot should take fp32 operands (with input_precision="ieee", never tf32).

    fp16/bf16 operands of one dtype go to the tensor cores with fp32 accumulation. fp32 inputs stay
    exact fp32 (tf32 would change top-K choices and gradients versus the torch reference). Under the
    interpreter bf16 arithmetic is broken (numpy has no bfloat16), so bf16 is converted to fp32 at once there.
    """
    first = dtypes[0]
    if any(d != first for d in dtypes) or first == torch.float32:
        return True
    return first == torch.bfloat16 and interpreting()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
