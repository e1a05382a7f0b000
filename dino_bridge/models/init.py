"""Initialisation helpers that make a model's init a pure function of the seed and the module tree.

Every helper draws the FULL tensor on the CPU in float32 from torch's default CPU generator and
then writes it into ``t`` (cast to ``t``'s dtype and device). So the values do not depend on the
device, on the parameter dtype, or on how the parameter is sharded:

- a plain tensor receives the full draw;
- a ``DTensor`` (a parameter sharded by FSDP2) receives only this rank's shard of the same full
  draw, so ``torch.manual_seed(s); model.init_weights()`` gives identical weights for any world
  size, mesh or placement.

All helpers run under ``torch.no_grad`` and return ``t``. Calling them on a ``meta`` tensor is a
no-op on the data but still consumes the same random numbers.

The cost is one full-size CPU draw per parameter on every rank (the largest DINOv3 tensor, a
262 144 x 512 prototype layer, is 0.5 GB in fp32), paid once at start-up.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

if dist.is_available():
    from torch.distributed.tensor import DTensor, distribute_tensor

    _HAS_SRC_DATA_RANK = "src_data_rank" in inspect.signature(distribute_tensor).parameters
else:  # torch built without distributed support: no DTensor can exist
    DTensor = None
    distribute_tensor = None
    _HAS_SRC_DATA_RANK = False

__all__ = [
    "constant_",
    "copy_",
    "init_linear",
    "normal_",
    "ones_",
    "trunc_normal_",
    "uniform_",
    "zeros_",
]


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@torch.no_grad()
def _write(t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Write the full-size CPU tensor ``full`` into ``t`` (only the local shard of a DTensor)."""
    assert tuple(full.shape) == tuple(t.shape), (tuple(full.shape), tuple(t.shape))
    if _is_dtensor(t):
        local = t.to_local()
        if local.is_meta:
            return t
        full = full.to(device=local.device, dtype=local.dtype)
        if _HAS_SRC_DATA_RANK:
            # src_data_rank=None: every rank chunks its own (identical) full draw, no communication.
            shard = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
        else:  # older torch: broadcasts/scatters rank 0's draw, which is identical anyway
            shard = distribute_tensor(full, t.device_mesh, t.placements).to_local()
        local.copy_(shard)
        return t
    if not t.is_meta:
        t.copy_(full.to(device=t.device, dtype=t.dtype))
    return t


def _empty_full(t: torch.Tensor) -> torch.Tensor:
    # ``t.shape`` of a DTensor is its global shape.
    return torch.empty(tuple(t.shape), dtype=torch.float32, device="cpu")


@torch.no_grad()
def trunc_normal_(t: torch.Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """N(0, std²) truncated to the ABSOLUTE interval [a, b] (the ``nn.init.trunc_normal_`` convention)."""
    return _write(t, torch.nn.init.trunc_normal_(_empty_full(t), mean=0.0, std=std, a=a, b=b))


@torch.no_grad()
def normal_(t: torch.Tensor, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """N(mean, std²)."""
    return _write(t, _empty_full(t).normal_(mean=mean, std=std))


@torch.no_grad()
def uniform_(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """U(low, high)."""
    return _write(t, _empty_full(t).uniform_(low, high))


@torch.no_grad()
def constant_(t: torch.Tensor, value: float) -> torch.Tensor:
    """Fill with ``value``."""
    return _write(t, _empty_full(t).fill_(value))


def zeros_(t: torch.Tensor) -> torch.Tensor:
    return constant_(t, 0.0)


def ones_(t: torch.Tensor) -> torch.Tensor:
    return constant_(t, 1.0)


@torch.no_grad()
def copy_(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Copy ``values`` (full size, or broadcastable to ``t``'s full shape) into ``t``."""
    full = torch.as_tensor(values, device="cpu")
    if full.is_floating_point():
        full = full.float()
    return _write(t, full.expand(tuple(t.shape)).contiguous())


def init_linear(linear: torch.nn.Linear, std: float = 0.02) -> None:
    """The DINOv3 Linear init: weight truncated-normal(std), bias zero."""
    trunc_normal_(linear.weight, std=std)
    if linear.bias is not None:
        zeros_(linear.bias)
