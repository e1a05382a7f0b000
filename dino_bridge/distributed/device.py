"""Device auto-selection and process-group setup.

Order: cuda → npu → mps → xpu → cpu, with backend nccl / hccl / gloo. ``MODEL.DEVICE`` is a
preference: it is used when that device is available, otherwise auto-detection wins (logged).
torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) and SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``, with ``MASTER_ADDR``/``MASTER_PORT`` exported by the job script) launch the same
entry point.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("dino_bridge")

BACKENDS = {"cuda": "nccl", "npu": "hccl", "xpu": "xccl", "mps": "gloo", "cpu": "gloo"}


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (oneDNN's check: AVX-512 or AMX).

    Without it (AVX2-only CPUs: many laptops, some cloud VMs) a bf16 matmul is emulated, 75-125x
    slower than fp32 (benchmarks/bench_cpu_bf16.py, 512x512 on an AVX2-only AMD EPYC), so bf16
    training on such a CPU is a trap rather than a saving."""
    try:
        probe = torch.ops.mkldnn._is_mkldnn_bf16_supported
    except (AttributeError, RuntimeError):  # a build without the probe: assume what the config says
        return True
    return bool(probe())


def device_available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "npu":
        return _npu_available()
    if kind == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return kind == "cpu"


def detect_device_type(preference: str = "auto") -> tuple[str, str | None]:
    """(device type, a note when the preference was overridden)."""
    preference = (preference or "auto").lower()
    if preference != "auto" and preference in BACKENDS and device_available(preference):
        return preference, None
    for kind in ("cuda", "npu", "mps", "xpu", "cpu"):
        if device_available(kind):
            note = None
            if preference != "auto":
                note = f"MODEL.DEVICE={preference!r} is not available here; using {kind}"
            return kind, note
    raise AssertionError("cpu is always available")  # pragma: no cover


def backend_for(device_type: str) -> str:
    backend = BACKENDS[device_type]
    if backend == "xccl" and not (hasattr(dist, "is_xccl_available") and dist.is_xccl_available()):
        return "gloo"
    return backend


@dataclass
class Runtime:
    device: torch.device
    backend: str | None
    rank: int
    world_size: int
    local_rank: int
    note: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        where = f"{self.device} (rank {self.rank}/{self.world_size}"
        return where + (f", backend {self.backend})" if self.backend else ")")


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) otherwise."""
    if "WORLD_SIZE" in os.environ:
        return (
            _env_int("RANK", default=0),
            _env_int("WORLD_SIZE", default=1),
            _env_int("LOCAL_RANK", default=0),
        )
    if "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return (
            _env_int("SLURM_PROCID", default=0),
            _env_int("SLURM_NTASKS", default=1),
            _env_int("SLURM_LOCALID", default=0),
        )
    return 0, 1, 0


def setup_runtime(preference: str = "auto", timeout_minutes: float = 30.0) -> Runtime:
    """Pick the device, and initialise the process group when launched with several processes."""
    device_type, note = detect_device_type(preference)
    rank, world_size, local_rank = launch_env()
    if device_type in ("cuda", "npu", "xpu"):
        getattr(torch, device_type).set_device(local_rank)
        device = torch.device(device_type, local_rank)
        if device_type == "cuda":
            # fp32 matmuls on TF32 tensor cores, as DINOv3 trains (fp32 master weights stay fp32)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    backend = None
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"{name} is not set: launch with torchrun, or export MASTER_ADDR/MASTER_PORT in the"
                    " SLURM job script (see README, 'Launching')"
                )
        backend = backend_for(device_type)
        if not dist.is_initialized():
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world_size))
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(minutes=timeout_minutes),
            )
    return Runtime(device, backend, rank, world_size, local_rank, note)


def shutdown_runtime() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def supports_float64(device: torch.device) -> bool:
    return device.type != "mps"
