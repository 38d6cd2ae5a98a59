"""Shared microbenchmark harness: timing, bandwidth reference, environment record, JSON output.

Timing uses CUDA events on a GPU (per-run start/end events, after warm-up) and perf_counter on the
CPU; the median of many runs is reported. `bench_ms` (the ops benchmark) also flushes the L2 cache
before every run on a GPU (triton.testing.do_bench when Triton is importable, else a 256 MB write), so
shapes that fit L2 are not timed from cache. Bandwidth fractions are taken against a large
device-to-device copy, FLOP fractions against a large matmul, both measured in the same process, so
they describe this device at this moment.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_unlearn import atomic


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, runs: int = 50,
            max_seconds: float = 10.0) -> Timing:
    """Median time of fn() after warm-up; stops early (at >= 3 runs) once max_seconds is spent."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() > budget_end:
            break
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], len(times))


def bench_ms(fn: Callable[[], object], device: torch.device, *, runs: int = 50, flush_l2: bool = True) -> Timing:
    """Median (p20, p80) ms of fn() with the L2 cache flushed before each run on a GPU."""
    if device.type != "cuda":
        return time_fn(fn, device, warmup=0 if runs <= 1 else 1 if runs <= 3 else 3, runs=runs)
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None and flush_l2:
        med, p20, p80 = do_bench(fn, warmup=10, rep=max(20, runs * 2), quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, runs)
    scratch = torch.empty(64 << 20, dtype=torch.float32, device=device)

    def flushed():
        if flush_l2:
            scratch.zero_()
        fn()

    t = time_fn(flushed, device, runs=runs)
    if flush_l2:  # subtract the flush itself, timed alone
        f = time_fn(lambda: scratch.zero_(), device, runs=runs)
        t = Timing(max(t.median_ms - f.median_ms, 1e-6), max(t.p20_ms - f.median_ms, 1e-6),
                   max(t.p80_ms - f.median_ms, 1e-6), t.runs)
    return t


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Achieved TFLOP/s of one large square matmul (the compute reference for FLOP fractions)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, runs=10 if device.type == "cuda" else 3)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Achieved GB/s (bytes read + bytes written) of a large device-to-device copy."""
    if nbytes is None:
        nbytes = 2 << 30 if device.type == "cuda" else 64 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, runs=20)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its core count (shared by every benchmark's JSON)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu {model} {os.cpu_count()} cores"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, payload: dict) -> Path:
    """Atomic write (temp file + rename): a crash never leaves a half-written result."""
    return atomic.write_json(path, payload, indent=2)


def timing_dict(t: Timing) -> dict:
    return asdict(t)


class RowLog:
    """A results file rewritten (atomically) after every row, so a run cut off by a time limit still
    returns every row it finished. `payload` holds the run's fixed fields; rows go under `key`."""

    def __init__(self, path: Path, payload: dict, key: str = "results"):
        self.path, self.payload, self.key = path, {**payload, key: []}, key
        self.write()

    @property
    def rows(self) -> list[dict]:
        return self.payload[self.key]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def update(self, **fields) -> None:
        self.payload.update(fields)
        self.write()

    def write(self) -> None:
        write_json(self.path, self.payload)


class Budget:
    """Seconds a step may spend starting rows: rows started after it is spent are recorded as skipped,
    so the step ends (and writes its file) before the shell's hard `timeout` kills it."""

    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.perf_counter() + seconds

    def spent(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end


def compiled_variants() -> int:
    """Triton kernels compiled so far by this process (every specialisation of every kernel of
    moe_unlearn.kernels); 0 under the interpreter, which compiles nothing. Private Triton state, read
    defensively: -1 where this Triton keeps it elsewhere."""
    import sys as _sys

    total = 0
    try:
        for name, mod in list(_sys.modules.items()):
            if not name.startswith("moe_unlearn.kernels.") or mod is None:
                continue
            for obj in vars(mod).values():
                fn = getattr(obj, "fn", obj)  # an Autotuner wraps the JITFunction
                caches = getattr(fn, "device_caches", None)
                if caches is None or not hasattr(fn, "run"):
                    continue
                for entry in caches.values():
                    total += len(entry[0])
    except Exception:
        return -1
    return total


def tie_free_logits(T: int, E: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, E] logits with no ties in any row, exactly representable in fp32, fp16 and bf16: each row is a
    random permutation of the integers 0..E-1 centred and scaled by a power of two, so neighbouring values
    differ by a distinct, exact gap and count comparisons with the reference are exact (E <= 256)."""
    if E > 256:
        raise ValueError("tie-free bf16 logits need E <= 256 (8 bits of mantissa)")
    ranks = torch.argsort(torch.rand(T, E, generator=generator), dim=1).float()
    step = 2.0 ** -max(0, (E - 1).bit_length() - 3)  # spread over about [-4, 4)
    return ((ranks - E // 2) * step).to(dtype)
