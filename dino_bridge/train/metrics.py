"""What a run reports: a progress bar, ``metrics.jsonl`` and a human-readable ``train.log``.

``metrics.jsonl`` holds one JSON object per logged iteration (rank 0 writes it; values are
averaged over ranks by the loop). On resume, records of iterations at or after the resume point
are dropped first, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger("dino_bridge")


def setup_logging(output_dir: str | os.PathLike | None, is_main: bool, rank: int = 0) -> None:
    """Console logging on rank 0 (warnings on every rank) and ``train.log`` in the output dir."""
    root = logging.getLogger("dino_bridge")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    root.propagate = False
    prefix = "" if is_main else f"[rank {rank}] "
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    root.addHandler(console)
    if output_dir is not None and is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(output_dir) / "train.log")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: device allocator peak on accelerators, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type in ("npu", "xpu") and hasattr(getattr(torch, device.type), "max_memory_allocated"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class MetricsFile:
    """Append-only JSON-lines file, rewritten once on resume to drop records from the future."""

    def __init__(self, path: str | os.PathLike, start_iteration: int, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if self.path.exists() and start_iteration > 0:
            kept = [
                line for line in self.path.read_text().splitlines() if _iteration_of(line) < start_iteration
            ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif self.path.exists() and start_iteration == 0:
            self.path.unlink()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def _iteration_of(line: str) -> float:
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a crash is dropped


class StepTimer:
    """Wall time and data-wait time over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent outside the steps (the online evaluation) out of the window."""
        self.start += seconds

    def summary(self) -> tuple[float, float, float]:
        """(seconds per step, data-wait share in [0, 1], steps) since the last reset."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        return elapsed / steps, self.data_wait / elapsed, self.steps


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,
        unit="it",
        desc="train",
        file=sys.stderr,
    )


def format_record(record: dict) -> str:
    keys = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss_cls")
    losses = " ".join(
        f"{k.replace('_loss', '').replace('_crops', '')}={record[k]:.4f}" for k in keys if k in record
    )
    knn = " ".join(f"{k.split('/')[1]}={v:.1f}%" for k, v in record.items() if k.startswith("knn/top"))
    return (
        f"it {record['iteration']} | {losses} | lr={record['lr']:.3g} T={record['teacher_temp']:.3f}"
        f" mom={record['mom']:.4f} | {record['images_per_sec']:.1f} img/s,"
        f" data {100 * record['data_wait_share']:.0f}% | mem {record['max_mem_mb']:.0f} MB"
        f" | skipped {record['skipped_images']}" + (f" | knn {knn}" if knn else "")
    )
