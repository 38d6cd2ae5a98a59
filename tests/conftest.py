"""Shared test setup. TRITON_INTERPRET must be set before any module decorates a Triton kernel.

Without a CUDA device the Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1 unless the
environment says otherwise). With one, they are compiled: CUDA tensors always run compiled kernels (the
interpreter would copy them to the CPU, and Triton 3.6's interpreter fails with numpy >= 2.4). Tests that
need the interpreter are marked `interpret`, tests that need a GPU `gpu`; each kind is skipped where it
cannot run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "interpret: runs Triton kernels on CPU tensors through the interpreter")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    interp_gpu = pytest.mark.skip(reason="TRITON_INTERPRET=1: GPU tests need compiled kernels (unset it)")
    no_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (Triton kernels on CPU tensors)")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(no_gpu)
            elif _interpreting():
                item.add_marker(interp_gpu)
        if "interpret" in item.keywords and not _interpreting():
            item.add_marker(no_interp)


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory):
    """One bench-model cache for the whole session, so the quick bench model is trained once."""
    return tmp_path_factory.mktemp("bench-cache")
