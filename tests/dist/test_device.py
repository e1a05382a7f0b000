import pytest
import torch

from dino_bridge.distributed import device as device_module
from dino_bridge.distributed import dist
from dino_bridge.distributed.device import backend_for, detect_device_type, launch_env


def _only(monkeypatch, available: set[str]):
    monkeypatch.setattr(device_module, "device_available", lambda kind: kind in available | {"cpu"})


def test_auto_detection_order(monkeypatch):
    _only(monkeypatch, {"mps", "xpu"})
    assert detect_device_type("auto") == ("mps", None)
    _only(monkeypatch, {"npu", "mps"})
    assert detect_device_type("auto") == ("npu", None)
    _only(monkeypatch, {"cuda", "npu"})
    assert detect_device_type("auto") == ("cuda", None)
    _only(monkeypatch, set())
    assert detect_device_type("auto") == ("cpu", None)


def test_the_config_device_is_a_preference(monkeypatch):
    _only(monkeypatch, {"cuda"})
    assert detect_device_type("cpu") == ("cpu", None)
    _only(monkeypatch, set())
    kind, note = detect_device_type("cuda")
    assert kind == "cpu" and "MODEL.DEVICE='cuda' is not available here; using cpu" in note


def test_backends():
    assert backend_for("cuda") == "nccl"
    assert backend_for("npu") == "hccl"
    assert backend_for("cpu") == backend_for("mps") == "gloo"


def test_launch_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_env() == (9, 16, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun wins over SLURM
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launch_env() == (3, 4, 3)


def test_several_processes_need_a_rendezvous_address(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        device_module.setup_runtime("cpu")


def test_float64_is_reduced_in_float32_where_the_backend_lacks_it(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_enabled", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "backend", lambda: "hccl")
    monkeypatch.setattr(dist.dist, "all_reduce", lambda t, op=None: calls.append(t.dtype) or t.mul_(2))
    value = torch.tensor([1.5], dtype=torch.float64)
    dist.all_reduce_(value)
    assert calls == [torch.float32] and value.dtype == torch.float64 and value.item() == 3.0
