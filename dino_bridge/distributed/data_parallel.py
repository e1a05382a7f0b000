"""Plain data parallel: every rank holds the whole model and gradients are averaged after backward.

No wrapper and no hooks: the student runs several forwards per step (global and local crops,
later the auxiliary streams), which is awkward for DDP's one-forward-one-backward contract, so
the loop calls ``average_gradients_`` explicitly between backward and the optimizer step.
Parameters without a gradient are skipped; every rank runs the same graph, so the set is the same
on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import dist

BUCKET_BYTES = 32 * 1024 * 1024


def average_gradients_(params: Iterable[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
    """All-reduce (sum, then divide by the world size) the gradients of ``params`` in flat buckets."""
    world = dist.get_world_size()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(grads: list[torch.Tensor], world: int) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce_(flat, op="sum")
        flat.div_(world)
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


@torch.no_grad()
def broadcast_parameters_(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s."""
    if dist.get_world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast_(tensor.data, src=src)
