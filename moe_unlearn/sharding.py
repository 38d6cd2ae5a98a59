"""FSDP2 sharded unlearning: models larger than one device, one shard of them per rank.

With `shard="fsdp2"` (CLI `--shard fsdp2`, under torchrun) every decoder layer, the embedding, the
final norm and the lm_head become FSDP2 units (`torch.distributed.fsdp.fully_shard`): each rank
stores 1/world of each, and a layer is gathered whole only while it runs. The parameters that hold
a trained tensor (the target layer's fused expert tensors and its router, for uoe) are kept whole
on every rank through `ignored_params`; they train exactly as in data parallel (shadow leaves,
gradients all-reduced by `GradAllReduce`), so the patch equals the one-process patch with
grad_accum = world * grad_accum, and rank 0 writes it from whole tensors.

Why the trained block is kept whole rather than the expert dimension sharded with owner-rank
updates: autograd materialises the gradient of the whole fused tensor before the slice hook keeps
the expert's part, so the backward of the target layer needs the whole block (gathered) plus its
whole gradient either way; keeping the block resident adds nothing to that peak, and every rank
can then update the trained slices itself (no owner rank, no broadcast of the update).

`load_sharded` reads a saved model straight into this layout (meta-device build, then each rank reads
from the safetensors files only its rows and the kept tensors), so no rank holds the whole checkpoint;
the tensors kept whole must be known before loading (`unlearning.engine.trained_names`).

The embedding, norm and lm_head are units of their own because the prefix cache
(moe_unlearn.arch.stack) calls them outside the model's own forward. A model the user already
wrapped with `fully_shard` is accepted when the tensors the run trains are whole on each rank
(wrapped with them in `ignored_params`); otherwise it is refused with one message, never trained
silently on a shard.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError

SHARD_MODES = ("fsdp2",)


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return ()
    return DTensor


def is_dtensor(p: torch.Tensor) -> bool:
    return isinstance(p, _dtensor_type())


def is_fsdp2(model: nn.Module) -> bool:
    """Whether any module of `model` is an FSDP2 unit (wrapped with `fully_shard`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank stores (its shard of each sharded one, whole ones whole)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if is_dtensor(p) else p
        total += t.numel() * t.element_size()
    return total


def shard_from_launcher(env: Mapping[str, str] | None = None) -> str | None:
    """The sharding an `accelerate launch` config asks for: its FSDP plugin maps onto "fsdp2"; a
    DeepSpeed ZeRO-3 config (or one whose stage is not said) is refused (ZeRO-3's backward fails once
    everything but the trained slices is frozen, which is what unlearning does); ZeRO-1/2 keep whole
    parameters, so they run data parallel. None when no launcher asks for sharding."""
    env = os.environ if env is None else env

    def on(name: str) -> bool:
        return str(env.get(name, "")).strip().lower() in ("1", "true", "yes")

    if on("ACCELERATE_USE_DEEPSPEED") and str(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")).strip() == "3":
        raise BadInputError("accelerate launch with a DeepSpeed ZeRO-3 config is not supported (its backward fails "
                            "once all but the trained slices are frozen); launch with an FSDP config, or torchrun "
                            "with --shard fsdp2")
    if on("ACCELERATE_USE_FSDP"):
        return "fsdp2"
    return None


def check_launch(shard: str | None, device_map: Any, world_size: int) -> None:
    """Refusals before any loading: data parallel or sharding over ranks cannot be combined with a
    device map (under torchrun every rank's map would span every visible GPU)."""
    if shard is not None and world_size <= 1:
        raise BadInputError(f"--shard {shard} shards the model over several processes: launch with torchrun "
                            "--nproc_per_node N (or accelerate launch with an FSDP config)")
    if device_map is not None and world_size > 1:
        how = "--shard fsdp2 shards the model over the ranks" if shard else "launch one process for --device-map"
        raise BadInputError(f"--device-map cannot be combined with {world_size} processes (each rank's map would "
                            f"span every visible GPU): {how}; or give --device-map in a single process")


def resolve_shard(shard: str | None, model: nn.Module) -> str | None:
    """The sharding of a run, checked before any work: `shard`, else "fsdp2" for a model the user
    already wrapped with `fully_shard`, else the accelerate launcher's; None = whole model per rank."""
    from moe_unlearn.distributed import sharded_kind

    shard = shard or ("fsdp2" if is_fsdp2(model) else None) or shard_from_launcher()
    if shard is None:
        from moe_unlearn.distributed import check_not_sharded

        check_not_sharded(model)
        return None
    if shard not in SHARD_MODES:
        raise BadInputError(f"shard must be one of {', '.join(SHARD_MODES)} or None, got {shard!r}")
    for name, p in model.named_parameters():
        why = sharded_kind(p)
        if why is not None and not is_dtensor(p):
            raise BadInputError(f"parameter {name} is a {why}; shard={shard!r} shards the model with FSDP2 itself: "
                                "pass the model unwrapped")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise BadInputError(f"shard={shard!r} shards the model over the ranks of torch.distributed: launch with "
                            "torchrun (or accelerate launch) and init the process group first")
    return shard


def trained_parameters(model: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
    """The parameters named `names` (those holding a trained tensor), each once."""
    from moe_unlearn.arch.wrappers import canonical_parameters

    params = canonical_parameters(model)
    out: dict[int, nn.Parameter] = {}
    for n in names:
        p = params[n]
        out[id(p)] = p
    return list(out.values())


def shard_units(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(decoder layers, [embedding, final norm, lm_head]) of a transformers decoder."""
    from moe_unlearn.arch.discovery import adapter_for, decoder_layers

    layers = list(decoder_layers(model, adapter_for(model).decoder_layer_lists)[1])
    base = getattr(model, "model", None)
    edges = [model.get_input_embeddings(), getattr(base, "norm", None), model.get_output_embeddings()]
    return layers, [m for m in edges if m is not None]


def shard_model(model: nn.Module, keep: Iterable[nn.Parameter]) -> nn.Module:
    """Wrap `model` in place with FSDP2: each decoder layer, the embedding, the final norm and the
    lm_head (one unit with the embedding when tied), then the root; the parameters in `keep` stay
    whole on every rank (`ignored_params`). Returns the model."""
    from torch.distributed.fsdp import fully_shard

    keep = set(keep)

    def ignored(mods: nn.Module | list[nn.Module]) -> set[nn.Parameter] | None:
        own = {p for m in (mods if isinstance(mods, list) else [mods]) for p in m.parameters()}
        return (own & keep) or None

    layers, (embed, *rest) = shard_units(model)
    for layer in layers:
        fully_shard(layer, ignored_params=ignored(layer))
    head = rest[-1] if rest else None
    tied = head is not None and getattr(head, "weight", None) is getattr(embed, "weight", None)
    first = [embed, head] if tied else embed
    fully_shard(first, ignored_params=ignored(first))
    for m in rest[:-1] if tied else rest:
        fully_shard(m, ignored_params=ignored(m))
    fully_shard(model, ignored_params=keep or None)
    _move_kept(model, keep)
    _backward_prefetch(model, layers, [embed, *rest], keep)
    _reshard_after_no_grad(model)
    return model


def _init_root(model: nn.Module) -> None:
    """Make `model` FSDP2's root now: FSDP2 does it on the first forward of the model, but when the first
    call is the prefix cache's embedding (a method without references, e.g. ga), the embedding would
    become a root of its own and the model's forward fail ("FSDP requires running forward through
    the root module first")."""
    state = getattr(model, "_get_fsdp_state", None)
    if state is not None:
        state()._lazy_init()


def _reshard_after_no_grad(model: nn.Module) -> None:
    """Every FSDP2 unit of `model` frees its gathered parameters after a forward without autograd (once
    per unit, however many runs see the model)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule) and not getattr(m, "_moe_unlearn_reshards", False):
            m.register_forward_hook(_reshard_without_graph)
            m._moe_unlearn_reshards = True


def _reshard_without_graph(module: nn.Module, args: Any, output: Any) -> None:
    """After a forward without autograd (the prefix cache's, the references'), free the gathered
    unit: no backward will need it. Called outside the model's own forward, FSDP2 would otherwise
    keep it gathered (measured: the embedding and the layers below the target stayed whole)."""
    if not torch.is_grad_enabled():
        module.reshard()


@torch.no_grad()
def _move_kept(model: nn.Module, keep: set[nn.Parameter]) -> None:
    """fully_shard moves the shards to the mesh's device (a model loaded on the CPU lands on each
    rank's GPU); the parameters kept whole are not its to move, so they follow here."""
    device = next((p.to_local().device for p in model.parameters() if is_dtensor(p)), None)
    if device is None:
        return
    for p in keep:
        if p.device != device and p.device.type != "meta":  # meta: materialised where the shards are
            p.data = p.data.to(device)


def _backward_prefetch(model: nn.Module, layers: list[nn.Module], edges: list[nn.Module],
                       keep: set[nn.Parameter]) -> None:
    """Explicit backward prefetch: each unit gathers the one the backward reaches next. FSDP2's
    implicit order replays the forward order, which includes the layers the prefix cache ran without
    a graph: gathered for a backward that never comes, they would stay whole on every rank."""
    from torch.distributed.fsdp import FSDPModule

    def trains(m: nn.Module) -> bool:
        return any(p in keep for p in m.parameters())

    low = min((i for i, layer in enumerate(layers) if trains(layer)), default=0)
    embed, *rest = edges
    chain = [m for m in rest[::-1] if isinstance(m, FSDPModule)]  # lm_head, norm (tied: one unit with embed)
    chain += layers[low:][::-1] + ([embed] if trains(embed) and embed not in chain else [])
    for m, nxt in itertools.pairwise(chain):
        m.set_modules_to_backward_prefetch([nxt])


def prepare(model: nn.Module, trained_names: Iterable[str]) -> bool:
    """Shard `model` for a run that trains the parameters `trained_names` (FSDP2 units, those whole),
    or check a model the user already sharded. Returns whether the prefix cache can run on it (its
    embedding, norm and lm_head callable outside the model's forward)."""
    keep = trained_parameters(model, trained_names)
    if not is_fsdp2(model):
        shard_model(model, keep)
        _init_root(model)
        return True
    from moe_unlearn.arch.wrappers import canonical_parameters

    split = [n for n, p in canonical_parameters(model).items() if is_dtensor(p) and any(p is k for k in keep)]
    if split:
        raise BadInputError(f"the model is sharded with fully_shard and the run trains {', '.join(split[:3])}, which "
                            "are sharded too: wrap it keeping them whole (fully_shard(..., ignored_params=...), see "
                            "moe_unlearn.sharding.shard_model), or pass the unwrapped model with shard='fsdp2'")
    from torch.distributed.fsdp import FSDPModule

    _reshard_after_no_grad(model)
    _init_root(model)
    _, edges = shard_units(model)
    return all(isinstance(m, FSDPModule) or not any(is_dtensor(p) for p in m.parameters()) for m in edges)


def load_sharded(path: Any, keep: Iterable[str] = (), *, trust_remote_code: bool = False, device: Any = None,
                 dtype: Any = None, report: dict[str, int] | None = None) -> nn.Module:
    """The model saved in `path`, sharded over the ranks with FSDP2 (`shard_model`), the parameters
    named in `keep` whole on every rank, without any rank holding the whole checkpoint: the model is
    built with its parameters on the meta device, sharded, and each rank then reads from the
    safetensors files only the rows of its shards (`safe_open(...).get_slice`) and the kept
    parameters. `report`, when given, receives bytes_read (this rank) and checkpoint_bytes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moe_unlearn.loading import check_model_dir, check_weights_cover_config, load_config, parse_dtype

    p = check_model_dir(path, trust_remote_code=trust_remote_code)
    config = load_config(p, trust_remote_code=trust_remote_code)
    check_weights_cover_config(p, config)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    if dtype in (None, "auto"):  # as from_pretrained: the dtype the config says the weights are in
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except Exception as exc:
        raise BadInputError(f"cannot build a causal LM from the config in {p}: {' '.join(str(exc).split())[:200]}") \
            from None
    shard_model(model, trained_parameters(model, keep))
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=_mesh_device(device))
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        read, total = _read_shards(model, p)
    if report is not None:
        report.update(bytes_read=read, checkpoint_bytes=total)
    return model.eval()


def _mesh_device(device: Any) -> torch.device:
    """Where FSDP2 put the shards: the rank's GPU under nccl, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device is None else torch.device(device)


def _rows(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the tensor this rank stores of `p`, first row, row count) of dim 0: FSDP2 splits it in chunks of
    ceil(n / world), rank r holding rows r * chunk onwards (fewer, or none, at the end)."""
    if not is_dtensor(p):
        return p.data, 0, p.shape[0] if p.dim() else 0
    import torch.distributed as dist

    local = p.to_local()
    chunk = math.ceil(p.shape[0] / dist.get_world_size())
    return local, min(dist.get_rank() * chunk, p.shape[0]), local.shape[0] if local.dim() else 0


def _read_shards(model: nn.Module, p: Any) -> tuple[int, int]:
    """Fill every parameter of the sharded `model` with its rows from the safetensors files of `p`
    (directly stored tensors: `get_slice` of the rows; fused expert tensors that the checkpoint stores
    one expert at a time: only this rank's experts, combined by transformers' own conversion ops).
    Returns (bytes read by this rank, bytes of the checkpoint)."""
    from collections import defaultdict

    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import MergeModulelist, WeightConverter, rename_source_key

    from moe_unlearn.errors import BadInputError
    from moe_unlearn.validate import check_tensor

    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"--shard fsdp2 reads safetensors weights; {p} has none")
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    params = dict(model.named_parameters())
    meta = {n: t for n, t in params.items()}
    where: dict[str, Any] = {}
    sources: dict[str, list[tuple[str, str | None]]] = defaultdict(list)  # parameter -> (checkpoint key, pattern)
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                sl = sf.get_slice(key)
                total += math.prod(sl.get_shape()) * _dtype_bytes(sl.get_dtype())
                name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
                if name in params:
                    where[key] = f
                    sources[name].append((key, pattern))
    missing = [n for n in params if n not in sources]
    if missing:
        raise BadInputError(f"the weight files in {p} do not hold {', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}; the folder is damaged or mixes two models")
    read = 0
    handles: dict[Any, Any] = {}

    def get(key: str, lo: int | None = None, n: int | None = None) -> torch.Tensor:
        nonlocal read
        f = where[key]
        if f not in handles:
            handles[f] = safe_open(str(f), "pt")
        t = handles[f].get_slice(key)[lo:lo + n] if lo is not None else handles[f].get_tensor(key)
        read += t.numel() * t.element_size()
        return t

    by_pattern = {src: c for c in converters for src in c.source_patterns}
    for name, param in params.items():
        local, lo, n = _rows(param)
        if is_dtensor(param) and n == 0:  # a last rank with no rows of this parameter (fewer rows than ranks)
            continue
        keys = sources[name]
        patterns = {pat for _, pat in keys}
        if patterns == {None}:  # stored as it is in the model: this rank's rows only
            (key, _), = keys
            value = get(key, lo, n) if is_dtensor(param) else get(key)
        else:
            conv = by_pattern[next(iter(patterns - {None}))]
            per_expert = isinstance(conv.operations[0], MergeModulelist) and conv.operations[0].dim == 0 and all(
                getattr(op, "dim", 1) >= 1 for op in conv.operations[1:])
            grouped: dict[str, list[tuple[int, str]]] = defaultdict(list)
            for key, pat in keys:
                found = re.search(re.escape(pat).replace(r"\*", r"(\d+)"), key)
                grouped[pat].append((int(found.group(1)) if found and found.groups() else 0, key))
            mine = range(lo, lo + n) if per_expert and is_dtensor(param) else None  # None: every expert
            inputs = {pat: [get(k) for e, k in sorted(grouped[pat]) if mine is None or e in mine]
                      for pat in conv.source_patterns if pat in grouped}
            for op in conv.operations:
                inputs = op.convert(inputs, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                    full_layer_name=name, model=model, config=model.config)
            (value,) = inputs.values()
            if is_dtensor(param) and not per_expert:  # a layout that mixes experts: combined whole, then cut
                value = value[lo:lo + n]
        if tuple(value.shape) != tuple(local.shape):
            raise BadInputError(f"the weight files in {p} hold {name} with shape {tuple(value.shape)} where this rank "
                                f"expects {tuple(local.shape)}; the config does not belong to these weights")
        if value.is_floating_point():
            check_tensor(f"weight {name} of the model in {p}", value, error=BadInputError)
        local.copy_(value.to(local.dtype))
    return read, total


def _dtype_bytes(name: str) -> int:
    """Bytes per element of a safetensors dtype name (F32, BF16, F8_E4M3, I64, ...)."""
    bits = re.search(r"(\d+)", name)
    return int(bits.group(1)) // 8 if bits else 1


__all__ = ["SHARD_MODES", "check_launch", "is_fsdp2", "load_sharded", "local_param_bytes", "prepare", "resolve_shard",
           "shard_from_launcher", "shard_model", "shard_units", "trained_parameters"]
