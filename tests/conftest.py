"""Shared test setup. TRITON_INTERPRET must be set before any module decorates a Triton kernel."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory):
    """One bench-model cache for the whole session, so the quick bench model is trained once."""
    return tmp_path_factory.mktemp("bench-cache")
