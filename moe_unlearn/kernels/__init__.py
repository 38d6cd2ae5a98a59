"""Triton kernels, one module per op (launcher + autograd Function); imported only when a Triton backend runs.

The sources live in the repository's top-level ``kernels/`` folder (the layout fixes it there), which is
deliberately *not* a Python package: a checkout-root ``kernels/__init__.py`` would shadow Hugging Face's
``kernels`` package, which transformers imports. Installed wheels carry the modules in this folder (setup.py
copies them at build time); in a source checkout or an editable install this package's search path is
extended to the top-level folder instead.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT_SOURCES = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "kernels")


def _in_checkout() -> bool:
    """The top-level folder is ours only when it sits beside this package in a moe-unlearn source tree
    (installed, the parent folder is site-packages, whose ``kernels`` is Hugging Face's package)."""
    if os.path.isfile(os.path.join(_HERE, "loramoe_delta.py")):  # wheel: the modules are already here
        return False
    root = os.path.dirname(_CHECKOUT_SOURCES)
    return (os.path.isfile(os.path.join(_CHECKOUT_SOURCES, "loramoe_delta.py"))
            and not os.path.exists(os.path.join(_CHECKOUT_SOURCES, "__init__.py"))
            and os.path.isfile(os.path.join(root, "setup.py")))


if _in_checkout():
    __path__.append(_CHECKOUT_SOURCES)  # noqa: F821 (package __path__)
