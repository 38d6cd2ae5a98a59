"""Input checks shared by every entry point, so a bad value fails up front with one message instead of
deep inside torch (a zero beta dividing by zero, a negative lr reaching AdamW, a token id past the
embedding table raising IndexError on the CPU and a device-side assert on CUDA).

One helper per kind of input, used at every boundary where that kind enters:
- scalars (`check_number`, `check_int`, `check_choice`): a number must also fit what torch does with
  it (an int fits int64, a float float32's finite range: `--seed 2**64` or `--lr 1e39` would pass
  Python's checks and overflow inside torch after the model loaded);
- typed config fields (`check_type`, `check_fields`): a value is checked against the type its dataclass
  declares; a string is never a boolean (``merge: "false"`` is refused, not read as true), a float is
  finite, containers are checked element by element;
- tensors read from files (`check_tensor`): weights, patches, adapters, Gram factors, attributions;
  finite and of the expected shape before anything uses them;
- files (`check_regular_file`, `read_text_file`, `read_json_file`): a regular file of bounded size (a
  FIFO would hang the reader, a link to /dev/zero would grow without end); JSON that is too deep, holds
  NaN/inf or a lone surrogate is one error, not a RecursionError or a UnicodeEncodeError later;
- memory (`check_allocation`): sizes from configs and flags are checked before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import stat
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moe_unlearn.errors import BadInputError, DataError

__all__ = ["FLOAT32_MAX", "INT64_MAX", "MAX_JSON_BYTES", "check_allocation", "check_choice", "check_fields",
           "MAX_ITEMS", "MAX_SEEDS", "MAX_STEPS", "MAX_TOKENS", "bounded", "check_generation_length",
           "check_int", "check_number", "check_regular_file", "config_positions", "data_limit_hint", "format_bytes", "max_data_bytes", "check_tensor", "check_text", "check_token_ids", "check_type",
           "embedding_rows", "parse_json", "read_json_file", "read_text_file"]

FLOAT32_MAX = 3.4028234663852886e38  # larger numbers overflow to inf in float32 math (the optimizer's lr)
INT64_MAX = 2**63 - 1  # torch's integers (seeds, sizes, indices) are int64
MAX_JSON_BYTES = 1 << 30  # a JSON input (config, attribution, results, patch.json) larger than this is refused
# Declared maxima of lengths and counts, so a typo (`--max-new-tokens 10**9`, `steps: 1e12` as an int)
# fails up front instead of decoding or training for days; `bounded` attaches them to config fields.
MAX_TOKENS = 1 << 20  # a sequence or generation length: no released model has more positions
MAX_STEPS = 10_000_000  # optimizer steps, evaluation intervals, distillation steps
MAX_ITEMS = 100_000_000  # sampled items, batch sizes, experts, ranks: sizes of things held in memory
MAX_SEEDS = 10_000  # seeds, step counts, learning rates per grid: each entry is a whole run
# Data files (.txt/.jsonl/.json) are read whole into memory; larger ones are refused before any read. The
# bound is an environment variable, not a flag: the same readers serve every command (--forget, --retain,
# --holdout, --split, locate, loramoe, relearn) and the Python API, and one variable reaches them all.
MAX_DATA_BYTES_ENV = "MOE_UNLEARN_MAX_DATA_BYTES"
DEFAULT_MAX_DATA_BYTES = 1 << 30


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float: a real, finite number (bools refused) inside [low, high] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
                value = float(value)
            else:
                raise TypeError
        except (TypeError, ImportError):
            raise BadInputError(f"{name} must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {value}")
    if abs(value) > FLOAT32_MAX:
        raise BadInputError(f"{name} = {value:g} overflows float32 (|x| <= {FLOAT32_MAX:.3g}); give a smaller number")
    if low is not None and (value < low or (low_open and value == low)):
        raise BadInputError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise BadInputError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int (bools and floats refused) inside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadInputError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise BadInputError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise BadInputError(f"{name} must be <= {high}, got {value}")
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise BadInputError(f"{name} = {value} does not fit a 64-bit integer; give a smaller number")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`, else BadInputError listing them."""
    choices = list(choices)
    if value not in choices:
        raise BadInputError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def embedding_rows(model: Any) -> int | None:
    """Rows of the model's input embedding table (the number of valid token ids), or None if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
        return int(weight.shape[0])
    return None


def check_token_ids(model: Any, sequences: Iterable[Any], *, what: str = "data") -> None:
    """DataError if any id in `sequences` (1-D tensors or lists of ints) is negative or not a row of the model's
    embedding table: the tokenizer does not belong to the model."""
    rows = embedding_rows(model)
    if rows is None:
        return
    import torch

    hi, lo = -1, 0
    for seq in sequences:
        t = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq, dtype=torch.long)
        if t.numel():
            hi, lo = max(hi, int(t.max())), min(lo, int(t.min()))
    if hi >= rows or lo < 0:
        bad = hi if hi >= rows else lo
        raise DataError(f"the {what} tokenizes to token id {bad}, but the model's embedding has {rows} rows "
                        "(valid ids 0..{}); the tokenizer does not belong to this model".format(rows - 1))


# -- typed config fields -------------------------------------------------------------------------

def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return "true or false (a boolean, not a string)"
    if annotation is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, dict) or annotation in (list, tuple, dict):
        return "a list" if origin in (list, tuple) or annotation in (list, tuple) else "a mapping"
    return {int: "an integer", float: "a finite number", str: "a string"}.get(annotation, getattr(
        annotation, "__name__", str(annotation)))


def check_type(name: str, value: Any, annotation: Any) -> Any:
    """`value` checked against a type annotation (a resolved typing object); returns it with containers
    normalised (a JSON list becomes the declared tuple). BadInputError naming `name` otherwise.

    bool: True/False only (never "false", "no", 0 or 1); int: integers, not bools, within int64;
    float: any real number but a bool, finite and within float32; str: strings; X | None, Literal[...];
    list[X], tuple[X, ...], tuple[X, Y], dict[K, V] (a list or tuple is accepted for a list or tuple);
    os.PathLike / Path: a string or a path; Any: anything; another class: an instance of it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return check_type(name, value, member)
            except BadInputError:
                continue
        raise BadInputError(f"{name} must be {_type_name(annotation)}, got {_short(value)}")
    if annotation is type(None):
        if value is not None:
            raise BadInputError(f"{name} must be null, got {_short(value)}")
        return None
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise BadInputError(f"{name} must be {_type_name(annotation)}, got {_short(value)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise BadInputError(f"{name} must be {_type_name(bool)}, got {_short(value)}")
        return value
    if annotation is int:
        return check_int(name, value)
    if annotation is float:
        return check_number(name, value)
    if annotation is str:
        if not isinstance(value, str):
            raise BadInputError(f"{name} must be a string, got {_short(value)}")
        _check_text(value, name, BadInputError)  # written to a results file, it could never be read back
        return value
    if annotation in (Path, os.PathLike) or origin is os.PathLike:
        if not isinstance(value, (str, os.PathLike)):
            raise BadInputError(f"{name} must be a path (a string), got {_short(value)}")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BadInputError(f"{name} must be a list, got {_short(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise BadInputError(f"{name} must be a list of {len(args)} items, got {_short(value)}")
            items = [check_type(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item = args[0] if args else Any
            items = [check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if (origin or annotation) is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise BadInputError(f"{name} must be a mapping, got {_short(value)}")
        key_t, val_t = args if args else (Any, Any)
        return {check_type(f"{name} key", k, key_t): check_type(f"{name}[{k!r}]", v, val_t) for k, v in value.items()}
    if isinstance(annotation, type):
        if not isinstance(value, annotation):
            raise BadInputError(f"{name} must be {_type_name(annotation)}, got {_short(value)}")
        return value
    return value  # an annotation this checker does not model (a TypeVar, a Callable): the caller's own checks


_RANGE = "moe_unlearn.range"  # dataclass field metadata key of `bounded`


def bounded(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            max_len: int | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numbers must lie in [low, high] (for a list or tuple field: each item) and,
    for a list or tuple, hold at most `max_len` items; `check_fields` enforces it. The one place a config
    declares a field's range, so every config states its maxima the same way."""
    md = {_RANGE: (low, high, max_len)}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _check_range(name: str, value: Any, low: float | None, high: float | None, max_len: int | None) -> None:
    if isinstance(value, (list, tuple)):
        if max_len is not None and len(value) > max_len:
            raise BadInputError(f"{name} holds {len(value)} items, more than the {max_len} allowed")
        for i, v in enumerate(value):
            _check_range(f"{name}[{i}]", v, low, high, None)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        check_int(name, value, low=None if low is None else math.ceil(low),
                  high=None if high is None else math.floor(high))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        check_number(name, value, low=low, high=high)


def check_fields(obj: Any, *, prefix: str = "", skip: Iterable[str] = ()) -> Any:
    """Check every field of the dataclass instance `obj` against its declared type (`check_type`) and its
    declared range (`bounded`), in place (containers normalised); returns `obj`. Field names in messages are
    `prefix + name`. Any config read from a file or the command line goes through this before its value
    checks."""
    hints = typing.get_type_hints(type(obj))
    skip = set(skip)
    for f in dataclasses.fields(obj):
        if f.name in skip or f.name not in hints:
            continue
        value = getattr(obj, f.name)
        checked = check_type(prefix + f.name, value, hints[f.name])
        if _RANGE in f.metadata and checked is not None:
            _check_range(prefix + f.name, checked, *f.metadata[_RANGE])
        if checked is not value:
            object.__setattr__(obj, f.name, checked)  # frozen dataclasses too
    return obj


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def config_positions(config: Any) -> int | None:
    """The positions a model config declares (`max_position_embeddings` or an older name, also inside a
    nested `text_config`); `config` is a config object or the dict of a config.json. None when unknown."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    for cfg in (config, get(config, "text_config")):
        if cfg is None:
            continue
        for key in _POSITION_KEYS:
            value = get(cfg, key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def config_layers(config: Any) -> int | None:
    """The decoder layers a model config declares (`num_hidden_layers`, also inside a nested `text_config`);
    `config` is a config object or the dict of a config.json. None when unknown."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    for cfg in (config, get(config, "text_config")):
        value = get(cfg, "num_hidden_layers") if cfg is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_layers(name: str, layers: Iterable[int], num_layers: int | None) -> None:
    """BadInputError when a layer index in `layers` is not a layer of a model with `num_layers` layers: a
    layer the model does not have would otherwise be skipped silently and reported as if it were measured."""
    if num_layers is None:
        return
    bad = sorted({x for x in layers if not 0 <= x < num_layers})
    if bad:
        raise BadInputError(f"{name} names layer(s) {bad}, but the model has {num_layers} layers "
                            f"(0..{num_layers - 1})")


MAX_RANKS = 1 << 20  # processes of one launch (WORLD_SIZE, --nproc)


def env_int(name: str, default: int, *, low: int = 0, high: int = MAX_RANKS) -> int:
    """The integer environment variable `name` (a launcher's WORLD_SIZE, LOCAL_RANK), `default` when unset;
    BadInputError naming the variable when it is not an integer in [low, high], instead of a ValueError
    traceback from int()."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadInputError(f"environment variable {name}={raw[:40]!r} is not an integer") from None
    return check_int(f"environment variable {name}", value, low=low, high=high)


def check_generation_length(name: str, value: Any, *, positions: int | None = None, low: int = 1) -> int:
    """A number of tokens to generate or compare: an integer in [low, MAX_TOKENS] and, when the model's
    position count is known (`positions`, e.g. `max_position_embeddings` read from config.json before the
    model loads), at most that: a longer generation would run past the positions the model was trained on."""
    value = check_int(name, value, low=low, high=MAX_TOKENS)
    if positions is not None and value > positions:
        raise BadInputError(f"{name} = {value} is more than the model's {positions} positions "
                            "(max_position_embeddings); give a smaller number")
    return value


# -- tensors read from files ---------------------------------------------------------------------

def check_tensor(what: str, t: Any, *, shape: Iterable[int | None] | None = None, finite: bool = True,
                 dtypes: Iterable[Any] | None = None, error: type[Exception] = BadInputError) -> Any:
    """`t` if it is a tensor of `shape` (None = any size on that axis), of one of `dtypes` (if given) and,
    for floating dtypes when `finite`, without NaN/inf; `error(message)` naming `what` otherwise. Large
    tensors are scanned in chunks, so the check needs little extra memory."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise error(f"{what} is a {type(t).__name__}, not a tensor")
    if shape is not None:
        shape = tuple(shape)
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise error(f"{what} has shape {list(t.shape)}, expected {want}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise error(f"{what} is stored as {str(t.dtype).removeprefix('torch.')}, expected "
                        + " or ".join(str(d).removeprefix("torch.") for d in dtypes))
    if finite and (t.is_floating_point() or t.is_complex()) and t.numel():
        flat = t.detach().reshape(-1)
        step = 1 << 24
        for start in range(0, flat.numel(), step):
            if not bool(torch.isfinite(flat[start:start + step]).all()):
                raise error(f"{what} holds NaN or inf values")
    return t


# -- files ---------------------------------------------------------------------------------------

def check_text(what: str, value: Any, *, error: type[Exception] = DataError) -> str:
    """A record field that becomes training or scoring text: a string, or a number written as one. A dict,
    list, bool or null is refused (its str() would be trained on), as is a string with a lone surrogate (no
    tokenizer can encode it)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise error(f"{what} holds a {type(value).__name__}, expected a string")
    text = value if isinstance(value, str) else str(value)
    _check_text(text, what, error)
    return text


def check_regular_file(path: str | os.PathLike, *, what: str = "file", max_bytes: int | None = None,
                       error: type[Exception] = DataError, hint: str = "") -> Path:
    """`path` if it is (or links to) an existing regular file of at most `max_bytes`; else `error`. A FIFO,
    a device (/dev/zero, /dev/stdin), a socket or a folder is refused before anything opens it."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"cannot read {what} {p}: it does not exist") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise error(f"{what} {p} is {kind}; pass a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {p} is {format_bytes(st.st_size)}, more than the {format_bytes(max_bytes)} this reader accepts"
                    + (f"; {hint}" if hint else ""))
    return p


def format_bytes(nbytes: int) -> str:
    """A size for messages: MiB, or bytes below one MiB."""
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def max_data_bytes() -> int:
    """The largest data file the readers accept: $MOE_UNLEARN_MAX_DATA_BYTES (bytes, or with a K/M/G/T
    suffix, powers of 1024) if set, else 1 GiB. A malformed value is a BadInputError, not a silent default."""
    raw = os.environ.get(MAX_DATA_BYTES_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_DATA_BYTES
    text = raw.strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1:] if text[-1:] in _UNITS and text[-1:] else ""
    try:
        value = int(text[:len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        value = 0
    if value < 1:
        raise BadInputError(f"{MAX_DATA_BYTES_ENV}={raw!r} is not a size; give bytes or a number with K, M, G "
                            "or T (e.g. 8G)")
    return value


def data_limit_hint() -> str:
    """How to read a larger data file, for the messages of the data readers."""
    return (f"if the data is meant to be this large, raise the limit with {MAX_DATA_BYTES_ENV} (e.g. "
            f"{MAX_DATA_BYTES_ENV}=8G) and make sure the memory holds it, or pass a datasets save_to_disk "
            "directory (memory-mapped)")


def read_text_file(path: str | os.PathLike, *, what: str = "file", max_bytes: int = MAX_JSON_BYTES,
                   error: type[Exception] = DataError, hint: str = "") -> str:
    """The UTF-8 text of a regular file of at most `max_bytes` (`check_regular_file`); `error` otherwise."""
    p = check_regular_file(path, what=what, max_bytes=max_bytes, error=error, hint=hint)
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # grew since the stat
        raise error(f"{what} {p} is larger than the {format_bytes(max_bytes)} this reader accepts"
                    + (f"; {hint}" if hint else ""))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def parse_json(text: str, *, what: str = "JSON", allow_nonfinite: bool = False,
               error: type[Exception] = DataError) -> Any:
    """`json.loads(text)`, with every way it can fail as one `error` naming `what`: invalid JSON, nesting too
    deep for the parser (RecursionError), NaN/Infinity or an overflowing number like 1e999 (unless
    `allow_nonfinite`), an integer too long to convert, and strings that are no text (a lone surrogate
    such as \\ud800, which every encoder and tokenizer downstream would refuse)."""
    kwargs: dict[str, Any] = {} if allow_nonfinite else {"parse_constant": _refuse_constant,
                                                         "parse_float": _finite_float}
    try:
        obj = json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to read") from None
    except ValueError as exc:  # a refused constant, an overflowing float, an int past the digit limit
        raise error(f"{what}: {' '.join(str(exc).split())[:120]}") from None
    stack = [obj]
    while stack:  # iterative: the object can be as deep as the parser allowed
        item = stack.pop()
        if isinstance(item, str):
            _check_text(item, what, error)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_text(k, what, error)
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return obj


def _check_text(s: str, what: str, error: type[Exception]) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} holds a string with a lone surrogate ({s[exc.start]!r} at position {exc.start}); "
                    "it is not text") from None


def read_json_file(path: str | os.PathLike, *, what: str = "file", max_bytes: int = MAX_JSON_BYTES,
                   allow_nonfinite: bool = False, error: type[Exception] = DataError, hint: str = "") -> Any:
    """The JSON value of a regular file of bounded size (`read_text_file` + `parse_json`)."""
    return parse_json(read_text_file(path, what=what, max_bytes=max_bytes, error=error, hint=hint),
                      what=f"{what} {path}",
                      allow_nonfinite=allow_nonfinite, error=error)


# -- memory --------------------------------------------------------------------------------------

def available_bytes(device: Any = None) -> int | None:
    """Free memory of `device` (a CUDA device: its free memory; else the host's available RAM), or None."""
    try:
        import torch

        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(dev)[0])
    except Exception:  # an unknown device is the caller's own check
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(what: str, nbytes: int, device: Any = None) -> None:
    """BadInputError before allocating `nbytes` for `what` when that is more than the device has free:
    a size from a config or a flag (an adapter rank, an expert count) fails here with one message instead
    of an out-of-memory kill minutes later."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise BadInputError(f"{what} needs about {nbytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
                            "free; choose smaller sizes")
