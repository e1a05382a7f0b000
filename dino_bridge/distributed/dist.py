"""A thin facade over ``torch.distributed``.

Every helper is a no-op (or the identity) when no process group is initialised, so library code
that calls them runs unchanged in a plain single-process CPU test. Collectives are always issued
by every rank in the same order: callers must never put one inside a rank-dependent branch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_FLOAT64_UNSUPPORTED_BACKENDS = {"hccl"}


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def backend() -> str | None:
    return dist.get_backend() if is_enabled() else None


def barrier() -> None:
    if is_enabled():
        dist.barrier()


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over all ranks (``op`` in sum/max/min/mean); returns ``tensor``.

    float64 is reduced in float32 on backends that lack it (HCCL), then cast back.
    """
    if not is_enabled() or get_world_size() == 1:
        return tensor
    reduce_op = getattr(dist.ReduceOp, _OPS["sum" if op == "mean" else op])
    if tensor.dtype == torch.float64 and backend() in _FLOAT64_UNSUPPORTED_BACKENDS:
        tmp = tensor.float()
        dist.all_reduce(tmp, op=reduce_op)
        tensor.copy_(tmp)
    else:
        dist.all_reduce(tensor, op=reduce_op)
    if op == "mean":
        tensor.div_(get_world_size())
    return tensor


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Out-of-place all-reduce: returns a new tensor, ``tensor`` is untouched."""
    return all_reduce_(tensor.clone(), op)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order.

    Ranks may hold different numbers of rows (the sizes are exchanged first); the other dims must
    agree. No autograd.
    """
    world = get_world_size()
    if world == 1:
        return tensor
    sizes = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s.item()) for s in all_sizes]
    max_rows = max(counts)
    padded = tensor.new_zeros((max_rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)], dim=0)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_enabled() and get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank; returns it on every rank."""
    if not is_enabled() or get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not is_enabled() or get_world_size() == 1:
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank iff ``flag`` is true on every rank (one MIN all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    all_reduce_(t, op="min")
    return bool(t.item())


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank iff ``flag`` is true on at least one rank (one MAX all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    all_reduce_(t, op="max")
    return bool(t.item())
