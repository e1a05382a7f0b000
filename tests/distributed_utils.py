"""Run a function on W gloo processes from inside pytest.

``spawn(fn, world_size, *args)`` starts ``world_size`` processes with ``torch.multiprocessing``,
initialises a gloo process group on a free local port in each, calls ``fn(rank, world_size, *args)``
and returns the list of per-rank return values (picklable; tensors are carried as numpy arrays).
An exception on any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", _pack(result)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Packed:
    """A tensor crossing the process boundary as a numpy array. A tensor put on the queue as is
    lives in shared memory that disappears when its rank exits, which races with the parent."""

    def __init__(self, tensor: torch.Tensor):
        self.array = tensor.detach().cpu().numpy()


def _map(value, fn):
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value)


def _pack(value):
    return _map(value, lambda v: _Packed(v) if torch.is_tensor(v) else v)


def _unpack(value):
    return _map(value, lambda v: torch.from_numpy(v.array) if isinstance(v, _Packed) else v)


def spawn(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, payload = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
            if dead:
                errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout:.0f}s (a hang in a collective?)")
            continue
        if status == "ok":
            results[rank] = _unpack(payload)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
