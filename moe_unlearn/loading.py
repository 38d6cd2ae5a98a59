"""The one way this package reads a model, config or tokenizer from disk.

Every `from_pretrained` in moe_unlearn goes through here, so three promises hold everywhere:

- nothing reaches the network: `local_files_only=True`, and the path must be an existing folder
  (a bare name such as "gpt2" is refused instead of being looked up on a hub);
- no code from the folder runs unless the caller says so: `trust_remote_code` is always passed
  explicitly (transformers would otherwise *ask* on stdin and run the code on "y"), and a folder
  whose config.json or tokenizer_config.json names its own classes (`auto_map`) is refused with
  a clear message unless `trust_remote_code=True`; pickled weights load with `weights_only=True`;
- a model whose weight files do not cover it (missing, unexpected or wrongly shaped tensors,
  which transformers would fill with random values and only warn about) is refused, as is a
  truncated or unreadable weights file.

Failures raise `BadInputError` with one line that names the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moe_unlearn.errors import BadInputError

__all__ = ["check_model_dir", "load_config", "load_model", "load_tokenizer", "remote_code_files", "resolve_device"]

_TRUST_HINT = "pass --trust-remote-code (trust_remote_code=True) only if you trust that code"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc}); pass a folder written by save_pretrained") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path} does not hold a JSON object; pass a folder written by save_pretrained")
    return data


def remote_code_files(path: str | os.PathLike) -> list[str]:
    """Names of the files in `path` that ask transformers to import the folder's own Python code
    (an `auto_map` entry in config.json or tokenizer_config.json, or a custom `tokenizer_class`
    mapping); empty for an ordinary folder."""
    path = Path(path)
    found = []
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        data = _read_json(path / name)
        if data and data.get("auto_map"):
            found.append(name)
    return found


def check_model_dir(path: str | os.PathLike, *, what: str = "model", trust_remote_code: bool = False,
                    need_config: bool = True) -> Path:
    """`path` as a Path after the checks that need no model code: an existing local folder (never a hub
    name), with config.json when `need_config`, and no `auto_map` code unless `trust_remote_code`."""
    p = Path(path)
    if not p.is_dir():
        raise BadInputError(f"{what} directory {p} does not exist or is not a directory; pass a local folder "
                            "written by save_pretrained (nothing is downloaded)")
    if need_config and not (p / "config.json").is_file():
        raise BadInputError(f"{what} directory {p} has no config.json; pass a folder written by save_pretrained")
    if not trust_remote_code:
        files = remote_code_files(p)
        if files:
            raise BadInputError(f"{what} directory {p} ships its own Python code ({', '.join(files)} has an "
                                f"auto_map entry), which is never run by default; {_TRUST_HINT}")
    return p


def resolve_device(name: str | None) -> Any:
    """The torch.device for a `--device` value: None -> cuda if available, else cpu. A malformed name or a
    device this machine lacks raises BadInputError (instead of a late error inside torch)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise BadInputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if device.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return device
    raise BadInputError(f"device {name!r} is not available here; use cpu or cuda")


def load_config(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """The model config of a local folder (AutoConfig)."""
    from transformers import AutoConfig

    p = check_model_dir(path, trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # anything transformers raises on a bad folder is a bad input
        raise BadInputError(f"cannot read the model config in {p}: {_one_line(exc)}") from None


def load_model(path: str | os.PathLike, *, trust_remote_code: bool = False, device: Any = None,
               meta: bool = False, **kwargs: Any) -> Any:
    """A causal LM (AutoModelForCausalLM) from a local folder, in eval mode, on `device` if given.

    meta=True builds it on the meta device from the config alone (structure, no weights, no memory).
    Extra keyword arguments go to from_pretrained (e.g. dtype). Weight files that do not cover the
    model exactly are refused rather than padded with random values."""
    import torch
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, trust_remote_code=trust_remote_code)
    if meta:
        config = load_config(p, trust_remote_code=trust_remote_code)
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise BadInputError(f"cannot build a causal LM from the config in {p}: {_one_line(exc)}") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            p, trust_remote_code=trust_remote_code, local_files_only=True, weights_only=True,
            output_loading_info=True, **kwargs)
    except Exception as exc:
        raise BadInputError(f"cannot load a causal LM from {p}: {_one_line(exc)}") from None
    problems = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "wrong shape"), ("error_msgs", "errors")):
        items = sorted(str(x[0] if isinstance(x, tuple) else x) for x in (info.get(key) or ()))
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    if problems:
        raise BadInputError(f"the weight files in {p} do not match its config: {'; '.join(problems)}; "
                            "the folder is damaged or mixes two models")
    model.eval()
    return model.to(device) if device is not None else model


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer (AutoTokenizer) saved in a local folder."""
    from transformers import AutoTokenizer

    p = check_model_dir(path, what="tokenizer", trust_remote_code=trust_remote_code, need_config=False)
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise BadInputError(f"cannot load a tokenizer from {p}: {_one_line(exc)}; save one there with "
                            "tokenizer.save_pretrained, or pass another folder") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
