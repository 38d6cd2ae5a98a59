"""The one way this package reads a model, config or tokenizer from disk.

Every `from_pretrained` in moe_unlearn goes through here, so three promises hold everywhere:

- nothing reaches the network: `local_files_only=True`, and the path must be an existing folder or
  a hub id (`org/name`) already in the local Hugging Face cache (`resolve_model_dir`; a bare name
  such as "gpt2" is refused, and an id that is not cached is refused with the command that fetches it);
- no code from the folder runs unless the caller says so: `trust_remote_code` is always passed
  explicitly (transformers would otherwise *ask* on stdin and run the code on "y"), and a folder
  whose config.json or tokenizer_config.json names its own classes (`auto_map`) is refused with
  a clear message unless `trust_remote_code=True`; pickled weights load with `weights_only=True`;
- a model whose weight files do not cover it (missing, unexpected or wrongly shaped tensors,
  which transformers would fill with random values and only warn about) is refused, as is a
  truncated or unreadable weights file; the sizes the config declares (layers, experts) are
  compared with the weight files' headers before anything is allocated, integer-typed weights
  are refused instead of cast, and loaded weights must be finite;
- every file of the folder is a regular file (a FIFO would hang the reader, a link to /dev/zero
  never end), JSON files of bounded size.

Failures raise `BadInputError` with one line that names the folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from moe_unlearn.errors import BadInputError

__all__ = ["DTYPES", "check_model_dir", "hub_cache_dir", "input_device", "load_config", "load_model", "load_tokenizer",
           "parse_device_map", "parse_dtype", "remote_code_files", "resolve_device", "resolve_model_dir"]

DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto": the dtype the checkpoint was saved in
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32"}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

_TRUST_HINT = "pass --trust-remote-code (trust_remote_code=True) only if you trust that code"


def _read_json(path: Path) -> dict[str, Any] | None:
    from moe_unlearn.validate import read_json_file

    if not path.exists() and not path.is_symlink():
        return None
    data = read_json_file(path, what="model file", error=BadInputError)
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


# A hub id as the hub spells it: "org/name", optionally "@revision" (a branch, tag or commit of the cache).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})(?:@(?P<rev>[\w.-]{1,100}))?$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now: $HF_HUB_CACHE, else $HF_HOME/hub,
    else huggingface_hub's default (~/.cache/huggingface/hub). Read at each call, not at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        return Path("~/.cache/huggingface/hub").expanduser()


def resolve_model_dir(path: str | os.PathLike, *, what: str = "model") -> Path:
    """The local folder `path` names: the folder itself if it exists, else, for a hub id `org/name`
    (or `org/name@revision`), its snapshot in the local Hugging Face cache (`hub_cache_dir`), found
    with `snapshot_download(local_files_only=True)`: nothing is downloaded. An id that is not cached
    raises BadInputError with the command that fetches it."""
    p = Path(path)
    if p.is_dir():
        return p
    m = _HUB_ID.match(os.fspath(path))
    if m is None or p.exists():
        raise BadInputError(f"{what} directory {p} does not exist or is not a directory; pass a local folder "
                            "written by save_pretrained or a hub id org/name already in the local Hugging Face "
                            "cache (nothing is downloaded)")
    repo, rev = m.group("repo"), m.group("rev")
    cache = hub_cache_dir()
    fetch = (f"fetch it once with `huggingface-cli download {repo}{f' --revision {rev}' if rev else ''}` "
             f"(or `hf download {repo}`), which fills {cache}, then run this again")
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True)
    except ImportError:
        raise BadInputError(f"{what} {repo!r} is not a local folder, and hub ids need the huggingface_hub "
                            "package to find them in the local cache") from None
    except Exception:  # LocalEntryNotFoundError and kin: not in the cache (never a network error here)
        raise BadInputError(f"{what} {p} is not a local folder, and the hub id {repo}"
                            f"{f'@{rev}' if rev else ''} is not in the local Hugging Face cache ({cache}; nothing is downloaded); "
                            f"{fetch}") from None
    from moe_unlearn.log import get_logger

    get_logger(__name__).info("%s %s: local Hugging Face cache snapshot %s", what, os.fspath(path), snap)
    return Path(snap)


def check_model_dir(path: str | os.PathLike, *, what: str = "model", trust_remote_code: bool = False,
                    need_config: bool = True) -> Path:
    """`path` as a local folder (`resolve_model_dir`: a folder, or a hub id found in the local cache)
    after the checks that need no model code: config.json when `need_config`, and no `auto_map`
    code unless `trust_remote_code`."""
    p = resolve_model_dir(path, what=what)
    if not p.is_dir():
        raise BadInputError(f"{what} directory {p} does not exist or is not a directory; pass a local folder "
                            "written by save_pretrained (nothing is downloaded)")
    _check_folder_files(p, what)
    if need_config and not (p / "config.json").is_file():
        raise BadInputError(f"{what} directory {p} has no config.json; pass a folder written by save_pretrained")
    if not trust_remote_code:
        files = remote_code_files(p)
        if files:
            raise BadInputError(f"{what} directory {p} ships its own Python code ({', '.join(files)} has an "
                                f"auto_map entry), which is never run by default; {_TRUST_HINT}")
    return p


def model_layers(path: str | os.PathLike) -> int | None:
    """The decoder layers a model folder's config.json declares (`config_layers`), without loading it."""
    from moe_unlearn.validate import config_layers

    return config_layers(_read_json(Path(path) / "config.json") or {})


def model_positions(path: str | os.PathLike) -> int | None:
    """The positions a model folder's config.json declares (`config_positions`), read without loading the
    model so a generation length can be checked first; None when it declares none."""
    from moe_unlearn.validate import config_positions

    return config_positions(_read_json(Path(path) / "config.json") or {})


def _check_folder_files(p: Path, what: str) -> None:
    """Every file of the folder (what transformers may open: configs, tokenizer files, weights) must be a
    regular file, or a link to one; folders inside it are not read and are left alone."""
    from moe_unlearn.validate import check_regular_file

    for entry in p.iterdir():
        if entry.is_dir():
            continue
        check_regular_file(entry, what=f"{what} file", error=BadInputError)


# Sizes a config may declare before the model is built (a config declaring two million layers would take
# minutes to build even on the meta device); far above any released model.
MAX_LAYERS = 1024
MAX_EXPERTS = 16384
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")
_EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def num_experts_of(config: Any) -> int | None:
    """The routed-expert count a config declares (the attribute names the families use), or None."""
    cfg = _text_config(config)
    for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    ffn = getattr(cfg, "ffn_config", None)  # DBRX
    value = getattr(ffn, "moe_num_experts", None) if ffn is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_config_sizes(config: Any, where: Any) -> None:
    """BadInputError when the config declares more layers or experts than any model has (MAX_LAYERS,
    MAX_EXPERTS) or a non-positive count: refused before the model is built."""
    cfg = _text_config(config)
    layers = getattr(cfg, "num_hidden_layers", None)
    experts = num_experts_of(config)
    for name, value, limit in (("num_hidden_layers", layers, MAX_LAYERS), ("number of experts", experts, MAX_EXPERTS)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise BadInputError(f"the config in {where} declares {name} = {value!r}; expected an integer in "
                                f"1..{limit}; the config is damaged")


def _weight_headers(p: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from the headers of the folder's .safetensors files (nothing is
    loaded); empty when the weights are in another format."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        except Exception as exc:
            raise BadInputError(f"cannot read the weights file {f}: {_one_line(exc)}; the folder is damaged") from None
    return out


def check_weights_cover_config(p: Path, config: Any) -> None:
    """Before anything is allocated: the weight files' headers must hold the layers and experts the config
    declares (a config declaring 4,000,000 experts over weights for 8 is refused), and no integer-typed
    weight unless the config names a quantization (an int32 router weight would be cast silently)."""
    headers = _weight_headers(p)
    if not headers:
        return
    where = p / "config.json"
    if getattr(config, "quantization_config", None) is None:
        ints = sorted(k for k, (_, dt) in headers.items() if not any(x in dt.upper() for x in ("F16", "F32", "F64",
                                                                                               "BF16", "F8")))
        if ints:
            raise BadInputError(f"the weights in {p} store {ints[0]} as {headers[ints[0]][1]} (not floating point) "
                                f"and the config names no quantization; convert the weights to a float dtype")
    cfg = _text_config(config)
    layers = getattr(cfg, "num_hidden_layers", None)
    have = {int(m.group(1)) for k in headers for m in [_LAYER_KEY.search(k)] if m}
    if isinstance(layers, int) and have and layers > len(have):
        raise BadInputError(f"{where} declares {layers} layers, the weight files hold {len(have)}; the config does "
                            "not belong to these weights")
    experts = num_experts_of(config)
    if experts is None:
        return
    numbered = {int(m.group(1)) for k in headers for m in [_EXPERT_KEY.search(k)] if m}
    if numbered:
        ok = experts <= len(numbered)
    else:
        ok = any(experts in shape for k, (shape, _) in headers.items() if _LAYER_KEY.search(k))
    if not ok:
        raise BadInputError(f"{where} declares {experts} experts per layer, which no tensor of the weight files has; "
                            "the config does not belong to these weights")


def check_finite_weights(model: Any, where: Any) -> None:
    """BadInputError naming the first parameter or buffer of `model` that holds NaN or inf (on a real device;
    offloaded/meta tensors are skipped)."""
    from moe_unlearn.validate import check_tensor

    for kind, named in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.device.type == "meta" or not t.is_floating_point():
                continue
            check_tensor(f"{kind} {name} of the model in {where}", t, error=BadInputError)


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


def parse_dtype(name: str | None) -> Any:
    """A `--dtype` value as what from_pretrained takes: None (its default), "auto", or a torch dtype.

    bf16 / fp16 models keep their trained copies in fp32 (moe_unlearn.unlearning.scopes), so
    loading a 29 GB bf16 checkpoint in bf16 costs 29 GB, not 58."""
    import torch

    if name is None:
        return None
    key = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise BadInputError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return key if key == "auto" else getattr(torch, key)


def parse_device_map(value: str | dict | None) -> Any:
    """A `--device-map` value: auto | balanced | balanced_low_0 | sequential, a JSON object
    {"module.path": device, ...} (inline or a .json file), or None (no device map)."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text in DEVICE_MAPS:
        return text
    from moe_unlearn.validate import parse_json, read_text_file

    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise BadInputError(f"--device-map {value!r}: expected {', '.join(DEVICE_MAPS)}, a JSON object or a "
                                ".json file of one")
        text = read_text_file(path, what="--device-map file", error=BadInputError)
    mapping = parse_json(text, what="--device-map", error=BadInputError)
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(k, str) for k in mapping) or not all(
            isinstance(v, (str, int)) for v in mapping.values()):
        raise BadInputError('--device-map: expected a JSON object {"module.path": "cuda:0" | 0 | "cpu", ...}')
    for v in set(mapping.values()):
        if v != "disk":
            resolve_device(f"cuda:{v}" if isinstance(v, int) else v)
    return mapping


def input_device(model: Any) -> Any:
    """Where a model's inputs go: the input embedding's device (the first device of a device_map
    model), else the first parameter's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def load_config(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """The model config of a local folder (AutoConfig)."""
    from transformers import AutoConfig

    p = check_model_dir(path, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # anything transformers raises on a bad folder is a bad input
        raise BadInputError(f"cannot read the model config in {p}: {_one_line(exc)}") from None
    check_config_sizes(config, p / "config.json")
    return config


def load_model(path: str | os.PathLike, *, trust_remote_code: bool = False, device: Any = None,
               device_map: Any = None, dtype: Any = None, meta: bool = False, **kwargs: Any) -> Any:
    """A causal LM (AutoModelForCausalLM) from a local folder, in eval mode, on `device` if given.

    device_map: spread the layers over devices as it says (`parse_device_map` values; needs the
    accelerate package); exclusive with `device`. dtype: `parse_dtype` values (None = transformers'
    default). meta=True builds it on the meta device from the config alone (structure, no weights,
    no memory). Extra keyword arguments go to from_pretrained. Weight files that do not cover the
    model exactly are refused rather than padded with random values."""
    import torch
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, trust_remote_code=trust_remote_code)
    device_map = parse_device_map(device_map)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    if device_map is not None:
        if device is not None:
            raise BadInputError("give --device or --device-map, not both")
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise BadInputError("--device-map needs the accelerate package (pip install accelerate)") from None
        kwargs["device_map"] = device_map
    if dtype is not None:
        kwargs["dtype"] = dtype
    if meta:
        config = load_config(p, trust_remote_code=trust_remote_code)
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                        **({"dtype": dtype} if dtype not in (None, "auto") else {}))
        except Exception as exc:
            raise BadInputError(f"cannot build a causal LM from the config in {p}: {_one_line(exc)}") from None
    check_weights_cover_config(p, load_config(p, trust_remote_code=trust_remote_code))
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
    check_finite_weights(model, p)
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
