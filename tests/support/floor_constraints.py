"""Write pip constraints that pin every declared dependency to its lowest allowed version.

Used by `make test-floor`: the suite then runs against the floors pyproject.toml promises, so a floor that
does not import (as `peft>=0.17` once did under transformers 5) is caught. torch is left to the caller's
TORCH_SPEC (its builds are chosen per machine), and a requirement without a lower bound is left free.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("test", "triton", "peft")  # what `make test` installs besides the core


def floor_pins(extras: tuple[str, ...] = EXTRAS) -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in extras:
        reqs += meta["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if req.name == "torch" or not lows:
            continue
        pins[req.name] = f"{req.name}=={max(lows, key=Version)}"
    return sorted(pins.values())


if __name__ == "__main__":
    out = "\n".join(floor_pins()) + "\n"
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(out)
    else:
        sys.stdout.write(out)
