"""Subcommands of `moe-unlearn`, plus the model flags they share.

Every command that loads a model takes the same four flags (`add_model_args`) and loads through
`load_from_args` (moe_unlearn.loading underneath: local files only, no folder code unless
--trust-remote-code):
  --device cpu|cuda|cuda:N      one device (default: cuda if available, else cpu; under torchrun
                                 each rank takes cuda:LOCAL_RANK)
  --device-map auto|balanced|JSON  spread the layers over the GPUs (accelerate), for models larger
                                 than one GPU; exclusive with --device
  --dtype auto|bfloat16|float16|float32  the weights' dtype (default: transformers' default)
  --trust-remote-code
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_model_args(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    """The shared model-loading flags (device flags only where the command runs the model)."""
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
        p.add_argument("--device-map", default=None, metavar="auto|balanced|JSON",
                       help="spread the layers over devices: auto, balanced, sequential, or a JSON object / .json "
                            'file {"model.layers.0": 0, ...} (needs accelerate; exclusive with --device)')
    p.add_argument("--dtype", default=None, metavar="auto|bfloat16|float16|float32",
                   help="dtype of the loaded weights (auto = as saved; default: transformers' default)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own Python code to run (off by default)")


def _template_text(value: str) -> str:
    return value.replace("\\n", "\n")  # a new line typed as \n on the command line


def add_template_args(p: argparse.ArgumentParser) -> None:
    """How question/answer records become text, the same flags for training and evaluation (the
    two must build the same tokens): --template TEXT, or --chat-template for the tokenizer's own."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--template", default=None, type=_template_text,
                   help="QA text template with {question} and {answer} (default: 'Question: {question}\\n"
                        "Answer: {answer}'); write a new line as \\n")
    g.add_argument("--chat-template", dest="template", action="store_const", const="chat",
                   help="render QA records with the tokenizer's chat template (apply_chat_template: user turn = "
                        "question, assistant turn = answer), as instruct models expect")


def _device(args: argparse.Namespace) -> Any:
    from moe_unlearn.loading import resolve_device
    from moe_unlearn.validate import env_int

    name = getattr(args, "device", None)
    if name is None and getattr(args, "device_map", None) is None and env_int("WORLD_SIZE", 1, low=1) > 1:
        import torch

        if torch.cuda.is_available():  # data parallel: one GPU per rank
            name = f"cuda:{env_int('LOCAL_RANK', 0)}"
    return resolve_device(name)


def load_from_args(args: argparse.Namespace, path: str | os.PathLike | None = None, *,
                   tokenizer: bool = True, tokenizer_path: str | os.PathLike | None = None,
                   **kwargs: Any) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None) of `path` (default: args.model) as the shared flags say."""
    from moe_unlearn.loading import load_model, load_tokenizer, parse_device_map, parse_dtype

    path = path if path is not None else args.model
    trust = bool(getattr(args, "trust_remote_code", False))
    device_map = parse_device_map(getattr(args, "device_map", None))  # bad flags fail before any loading
    dtype = parse_dtype(getattr(args, "dtype", None))
    if device_map is not None and getattr(args, "device", None) is not None:
        from moe_unlearn.errors import BadInputError

        raise BadInputError("give --device or --device-map, not both")
    device = None if device_map is not None else _device(args)
    tok = load_tokenizer(tokenizer_path or path, trust_remote_code=trust) if tokenizer else None  # cheap, so first
    model = load_model(path, trust_remote_code=trust, device=device, device_map=device_map, dtype=dtype, **kwargs)
    return model.eval(), tok
