"""Data parallel through torch.distributed, and the refusal of sharded models.

Under `torchrun` / `accelerate launch` every rank holds the whole model (or its device_map
part), reads its own share of the data and trains the same small leaves (one expert's
slices, routers): after each backward the leaves' gradients are averaged over the ranks, so
every rank takes the same optimizer step and ends with the same weights. 2 ranks with
grad_accum g are one process with grad_accum 2g on the union of the data (micro-batch i of a
step goes to rank i mod world). Only rank 0 writes files.

Nothing here starts a process group for library callers; `init_from_env()` does it for the CLI
when the launcher's environment (WORLD_SIZE > 1) says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError
from moe_unlearn.training import TrainHooks
from moe_unlearn.validate import env_int


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Start the process group a launcher asked for (env WORLD_SIZE > 1); True if one runs.

    Backend: nccl for CUDA devices, gloo otherwise. Each rank uses cuda:LOCAL_RANK."""
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    if env_int("WORLD_SIZE", 1, low=1) <= 1:
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(env_int("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def _reduce_device(t: torch.Tensor) -> torch.device:
    """Where a collective runs: the tensor's own device for nccl, the CPU for gloo."""
    dist = _dist()
    return t.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(t: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) `t` over the ranks in place; a no-op in one process. float64 sums of
    integer-valued counts are exact, so statistics reduced this way match one process."""
    dist = _dist()
    if dist is None:
        return t
    buf = t.to(_reduce_device(t))
    dist.all_reduce(buf)
    if mean:
        buf /= dist.get_world_size()
    if buf is not t:
        t.copy_(buf)
    return t


def average_terms(terms: Mapping[str, float]) -> dict[str, float]:
    """Mean of each logged term over the ranks (every rank must log the same names)."""
    if _dist() is None or not terms:
        return dict(terms)
    names = sorted(terms)
    vals = torch.tensor([float(terms[k]) for k in names], dtype=torch.float64)
    all_reduce_(vals, mean=True)
    return dict(zip(names, vals.tolist(), strict=True))


class RankShard:
    """The share of one rank of an epoch's items: items i with i mod world == rank.

    Every rank gets the same count (floor(n / world)) so that collectives line up; the last
    n mod world items of an epoch are not used (`dropped` says how many)."""

    def __init__(self, items: Any, rank: int, world_size: int) -> None:
        self.items, self.rank, self.world_size = items, rank, world_size
        n = len(items)
        if n < world_size:
            raise BadInputError(f"{world_size} ranks need at least {world_size} forget batches, got {n}; "
                                "use a smaller --batch-size or fewer processes")
        self.per_rank = n // world_size
        self.dropped = n - self.per_rank * world_size

    def __len__(self) -> int:
        return self.per_rank

    def __call__(self, epoch: int) -> list[Any]:
        items = self.items(epoch) if callable(self.items) else list(self.items)
        return items[self.rank::self.world_size][: self.per_rank]


class GradAllReduce(TrainHooks):
    """Averages the trained leaves' gradients over the ranks after each backward (a leaf with no
    gradient on a rank, e.g. an expert no token of its batch reached, counts as zero) and the
    logged terms; at the start, broadcasts rank 0's leaves so that every rank starts equal."""

    def __init__(self, leaves: Sequence[torch.Tensor], write_back: Any = None) -> None:
        self.leaves = list(leaves)
        self.write_back = write_back

    def on_train_start(self, optimizer: torch.optim.Optimizer) -> None:
        dist = _dist()
        if dist is None:
            return
        with torch.no_grad():
            for p in self.leaves:
                buf = p.detach().to(_reduce_device(p))
                dist.broadcast(buf, src=0)
                p.copy_(buf)
        if self.write_back is not None:
            self.write_back()

    def after_backward(self, step: int) -> None:
        if _dist() is None:
            return
        for p in self.leaves:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(torch.float32) for p in self.leaves])
        all_reduce_(flat, mean=True)
        offset = 0
        for p in self.leaves:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def reduce_terms(self, terms: Mapping[str, float]) -> dict[str, float]:
        return average_terms(terms)


def sharded_kind(p: torch.Tensor) -> str | None:
    """Why `p` is not a whole local tensor, or None."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        DTensor = ()  # noqa: N806
    if isinstance(p, DTensor):
        return "FSDP2 / tensor-parallel DTensor"
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return "DeepSpeed ZeRO-3 partitioned parameter"
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        return "FSDP1 flat parameter"
    return None


def check_not_sharded(model: nn.Module) -> None:
    """One clear error for a model whose parameters are sharded over ranks (FSDP1/2, ZeRO-3).

    Expert slices, patches and attribution read and write whole local tensors; on a sharded
    model they would see only this rank's shard (or an empty placeholder) and train nothing.
    Called before any work, so nothing is half-done."""
    for name, p in model.named_parameters():
        why = sharded_kind(p)
        if why is not None:
            raise BadInputError(
                f"parameter {name} is a {why}: moe-unlearn needs whole tensors on each rank (it trains "
                "slices of single experts and writes patches of them). Load the full model on every rank "
                "and run data parallel (torchrun, no fully_shard / ZeRO-3), or split layers over GPUs "
                "with device_map='auto'")
