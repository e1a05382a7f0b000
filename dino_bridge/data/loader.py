"""The training DataLoader.

Randomness lives in the sampler (order), the dataset (views, from (seed, rank, position)) and the
collate (masks, from the batch's first position), never in worker state, so the batches are identical
for any ``num_workers``. The trainer computes the resume position itself (iterations × batch size):
the sampler object runs ahead of training because workers prefetch.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from dino_bridge.data.sampler import ShardedInfiniteSampler
from dino_bridge.data.ssl_dataset import SSLTrainDataset


def detach_from_stop_signals(worker_id: int) -> None:
    """A worker's ``worker_init_fn``: stop signals sent to the whole process group stay the main
    process's to handle.

    Ctrl-C, ``timeout`` and ``kill -TERM -<pgid>`` signal every process of the group; a worker that
    died of it crashed the main process's graceful stop ("DataLoader worker exited unexpectedly")
    before its checkpoint. A worker therefore leaves the group (its own process group) and ignores
    SIGINT, but keeps SIGTERM's default: the DataLoader and multiprocessing's exit handler stop
    workers with SIGTERM, and a worker that ignored it would hang the main process at exit. A
    launcher that signals every process by pid (SLURM's step tracking) still reaches the workers."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(
    dataset: SSLTrainDataset,
    *,
    batch_size: int,
    num_workers: int,
    sampler: ShardedInfiniteSampler,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """An endless loader of collated batches (``drop_last``; persistent workers when ``num_workers > 0``)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    worker_options: dict[str, Any] = {}
    if num_workers > 0:
        worker_options["persistent_workers"] = True
        worker_options["worker_init_fn"] = detach_from_stop_signals
        if prefetch_factor is not None:
            worker_options["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=True,
        **worker_options,
    )
