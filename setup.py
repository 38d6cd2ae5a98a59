"""Build hook: compiles csrc/ as a torch CUDA extension only when asked (MOE_UNLEARN_CUDA_EXT=1).

Everything else is declared in pyproject.toml. The extension is opt-in because the
dispatch layer never picks it on its own (Triton is the fast path) and its build
takes minutes of nvcc time; `MOE_UNLEARN_NO_CUDA_EXT=1` still forces it off (it wins
over MOE_UNLEARN_CUDA_EXT). Asked for on a machine without a CUDA torch or without
nvcc, the package installs without it and says why.

The Triton sources live in the top-level kernels/ folder, which is not a Python
package (it would shadow Hugging Face's `kernels`); `BuildPyWithKernels` copies
them into moe_unlearn/kernels/ of every wheel.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_SOURCES = "kernels"


class BuildPyWithKernels(build_py):
    """build_py that also places kernels/*.py into the built moe_unlearn/kernels/ package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # editable: moe_unlearn/kernels/__init__.py reaches the folder itself
            return
        target = os.path.join(self.build_lib, "moe_unlearn", "kernels")
        self.mkpath(target)
        for src in sorted(glob.glob(os.path.join(KERNEL_SOURCES, "*.py"))):
            self.copy_file(src, os.path.join(target, os.path.basename(src)))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        if self.editable_mode:
            return super().get_outputs(include_bytecode)
        extra = [os.path.join(self.build_lib, "moe_unlearn", "kernels", os.path.basename(p))
                 for p in sorted(glob.glob(os.path.join(KERNEL_SOURCES, "*.py")))]
        return [*super().get_outputs(include_bytecode), *extra]


def _cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("MOE_UNLEARN_NO_CUDA_EXT") == "1":
        print("moe-unlearn: MOE_UNLEARN_NO_CUDA_EXT=1, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    if os.environ.get("MOE_UNLEARN_CUDA_EXT") != "1":  # opt-in: quiet default, Triton/torch paths only
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env
        print(f"moe-unlearn: torch not importable at build time ({exc}); no CUDA extension", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:  # CUDA_HOME is None when no nvcc/toolkit is found
        print("moe-unlearn: no CUDA torch/nvcc here; building without the CUDA extension (Triton/torch paths only)",
              file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        name="moe_unlearn._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithKernels})
