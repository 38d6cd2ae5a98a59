"""A process started in the checkout root sees the checkout first on sys.path (`python -m pytest`, `python -c`,
`python setup.py`). Nothing there may shadow an installed package: transformers imports Hugging Face's
`kernels` package, and a top-level `kernels/__init__.py` of ours once hid it. These run real subprocesses
from the root, the way a new user and CI start them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run from `cwd` with the caller's environment, minus any PYTHONPATH unless given in `env`."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env = {**base, "MOE_UNLEARN_NO_CUDA_EXT": "1", **env}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_top_level_kernels_folder_is_not_a_package():
    assert (ROOT / "kernels" / "loramoe_delta.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "a top-level kernels package shadows Hugging Face's"
    assert not (ROOT / "kernels.py").exists()


def test_python_c_from_the_root_imports_transformers_and_loads_a_model(tmp_path):
    from moe_unlearn.testing import tiny_model

    tiny_model("qwen3_moe", seed=0).save_pretrained(tmp_path / "tiny")
    code = (
        "import sys, transformers.activations, moe_unlearn as mu\n"
        "import moe_unlearn.kernels.loramoe_delta as k\n"
        f"m = mu.load_model({str(tmp_path / 'tiny')!r})\n"
        "assert len(mu.find_moe_layers(m)) > 0\n"
        "import kernels\n"
        "print(kernels.__file__)\n"
        "print(k.__file__)\n"
    )
    res = _run([sys.executable, "-c", code], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    hf_kernels, ours = res.stdout.strip().splitlines()[-2:]
    assert not Path(hf_kernels).resolve().is_relative_to(ROOT / "kernels"), hf_kernels
    assert Path(ours).resolve() == (ROOT / "kernels" / "loramoe_delta.py").resolve()


@pytest.mark.parametrize("flags", [["-P"], []], ids=["safe-path", "root-first"])
def test_pytest_collects_the_suite_from_the_root(flags):
    res = _run([sys.executable, *flags, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
               cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    collected = [line for line in res.stdout.splitlines() if "::" in line]
    assert len(collected) > 500 and "errors" not in res.stdout.splitlines()[-1]


def test_a_wheel_carries_the_kernels_inside_the_package(tmp_path):
    src = tmp_path / "src"  # a copy, so the build writes nothing into the checkout
    skip = (".venv", ".git", "build", "dist", "__pycache__", "*.egg-info", "*.pyc", "*.so", "results")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    build = _run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_wheel({str(tmp_path)!r}))"],
                 cwd=src)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = tmp_path / build.stdout.strip().splitlines()[-1]
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(target)
    assert {"moe_unlearn/kernels/__init__.py", "moe_unlearn/kernels/routing_stats.py"} <= names
    assert not any(n.startswith("kernels/") for n in names)
    code = ("import moe_unlearn.kernels as k, moe_unlearn.kernels.routing_stats as r\n"
            "print(len(k.__path__), r.__file__)")
    res = _run([sys.executable, "-P", "-c", code], cwd=tmp_path, PYTHONPATH=str(target))
    assert res.returncode == 0, res.stderr[-3000:]
    n_paths, where = res.stdout.split()
    assert n_paths == "1" and Path(where).resolve().is_relative_to(target.resolve())


def test_floor_constraints_pin_every_declared_lower_bound():
    tomllib = pytest.importorskip("tomllib")
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    try:
        from floor_constraints import floor_pins
    finally:
        sys.path.pop(0)
    pins = dict(p.split("==") for p in floor_pins())
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch" not in pins  # chosen per machine by TORCH_SPEC
    assert pins["transformers"] == "5.23" and pins["peft"] == "0.18"
    declared = [d for d in meta["dependencies"] if ">=" in d and not d.startswith("torch")]
    assert len(pins) >= len(declared)
    for dep in declared:
        name, low = dep.split(">=")
        assert pins[name.split("[")[0]] == low.split(",")[0], dep
