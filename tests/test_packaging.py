"""The source distribution carries csrc/ and every package file, a wheel built from it installs every
module, the extras are declared, and the package imports and runs its ops without Triton."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SKIP = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _source_files(folder: str) -> set[str]:
    """Files under ROOT/folder as relative posix paths, caches and egg-info left out."""
    out = set()
    for path in (ROOT / folder).rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not (set(rel.parts) & _SKIP) and path.suffix not in (".pyc", ".so"):
            out.add(rel.as_posix())
    return out


def _build(kind: str, src: Path, out: Path) -> Path:
    """Build an sdist or wheel of `src` with setuptools' PEP 517 backend (no isolation, no network)."""
    env = {**os.environ, "MOE_UNLEARN_NO_CUDA_EXT": "1"}
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    res = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"  # a copy, so the build writes no egg-info into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*_SKIP, "*.egg-info", "*.pyc", "*.so"))
    path = _build("sdist", src, tmp)
    with tarfile.open(path) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
        tf.extractall(tmp / "unpacked", filter="data")
    return tmp / "unpacked" / path.name.removesuffix(".tar.gz"), names


def test_sdist_lists_csrc_and_every_package_file(sdist):
    _, names = sdist
    wanted = _source_files("csrc") | _source_files("kernels") | _source_files("moe_unlearn")
    assert any(n.endswith(".cu") for n in wanted) and "moe_unlearn/loramoe/README.md" in wanted
    missing = sorted(wanted - set(names))
    assert not missing, f"missing from the sdist: {missing}"
    for top in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        assert top in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_built_from_the_sdist_installs_every_module(sdist, tmp_path):
    unpacked, _ = sdist
    wheel = _build("wheel", unpacked, tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    expected = {f"moe_unlearn/{p.removeprefix('moe_unlearn/')}" for p in _source_files("moe_unlearn")}
    expected |= {f"moe_unlearn/kernels/{p.removeprefix('kernels/')}" for p in _source_files("kernels")}
    missing = sorted(expected - names)
    assert not missing, f"in the source tree but not in the wheel: {missing}"


def test_extras_and_bounds_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    assert {"triton", "eval", "peft", "megablocks"} <= set(extras)
    assert any(d.startswith("lm-eval") or d.startswith("lm_eval") for d in extras["eval"])
    assert not any(d.startswith("triton") for d in meta["dependencies"]), "triton must be an extra, not a dependency"
    transformers = next(d for d in meta["dependencies"] if d.startswith("transformers"))
    assert "<6" in transformers.replace(" ", "")


def test_version_flag_prints_the_package_version(capsys):
    import moe_unlearn
    from moe_unlearn.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"moe-unlearn {moe_unlearn.__version__}"


def test_no_module_of_the_package_imports_triton_or_the_kernels_at_import_time():
    # top-level statements only: imports inside functions run when a Triton backend is chosen
    offenders = []
    for path in sorted((ROOT / "moe_unlearn").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "triton" or n.startswith("triton.") or n.startswith("moe_unlearn.kernels") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"top-level triton/kernel imports: {offenders}"


def test_ops_run_and_triton_is_refused_where_triton_cannot_be_imported(monkeypatch):
    import torch

    from moe_unlearn import ops
    from moe_unlearn.errors import BackendUnavailable
    from moe_unlearn.ops import dispatch

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    dispatch.triton_importable.cache_clear()
    try:
        assert not dispatch.triton_importable()
        g = torch.Generator().manual_seed(3)
        x, A, B = torch.randn(5, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 6, 2, generator=g)
        gates = torch.softmax(torch.randn(5, 3, generator=g), -1)
        out = ops.loramoe_delta(x, A, B, gates, scale=2.0)
        ref = 2.0 * torch.einsum("te,teo->to", gates, torch.einsum("eor,ter->teo", B, torch.einsum("erd,td->ter", A, x)))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(BackendUnavailable, match="triton is not importable"):
            ops.loramoe_delta(x, A, B, gates, scale=2.0, backend="triton")
    finally:
        dispatch.triton_importable.cache_clear()
