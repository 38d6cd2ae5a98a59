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
The commands that run a model over data (unlearn, attribute, evaluate) also take --shard fsdp2
(`add_shard_arg`): under torchrun each rank stores a shard of every layer (moe_unlearn.sharding).
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


def add_shard_arg(p: argparse.ArgumentParser) -> None:
    """--shard: the model sharded over the ranks of torchrun / accelerate launch (FSDP2)."""
    from moe_unlearn.sharding import SHARD_MODES

    p.add_argument("--shard", choices=SHARD_MODES, default=None,
                   help="fsdp2 (under torchrun --nproc_per_node N): every rank stores 1/N of each layer (FSDP2) and "
                        "reads only that share of the weights; the results equal one process")


def launch_shard(args: argparse.Namespace) -> str | None:
    """The sharding of a command, checked before anything loads: --shard, else what an accelerate
    launcher's config asks for (FSDP -> fsdp2, DeepSpeed ZeRO-3 refused); sharding without several
    processes, or a device map with several, is refused. Starts the process group a launcher asked
    for; a sharded run loads on the CPU unless --device says otherwise (fully_shard moves each
    rank's shards to its GPU)."""
    from moe_unlearn.distributed import init_from_env
    from moe_unlearn.sharding import check_launch, shard_from_launcher

    shard = getattr(args, "shard", None) or shard_from_launcher()
    check_launch(shard, getattr(args, "device_map", None), int(os.environ.get("WORLD_SIZE", "1")))
    init_from_env(getattr(args, "device", None))
    if shard and getattr(args, "device", None) is None:
        args.device = "cpu"
    return shard


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
                   shard: str | None = None, keep: Any = (), **kwargs: Any) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None) of `path` (default: args.model) as the shared flags say.
    With `shard` the model is loaded sharded (moe_unlearn.sharding.load_sharded): each rank reads its
    share, the parameters named in `keep` (the ones a run changes) whole."""
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
    if shard:
        from moe_unlearn.sharding import load_sharded

        model = load_sharded(path, keep, trust_remote_code=trust, device=device, dtype=dtype)
        return model.eval(), tok
    model = load_model(path, trust_remote_code=trust, device=device, device_map=device_map, dtype=dtype, **kwargs)
    return model.eval(), tok
