"""Shared helpers for end-to-end tests: synthetic image sets and a tiny training config."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image

from dino_bridge.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SEED_YAML = CONFIGS / "dinov3_vitlarge_pretrain.yaml"


def synthetic_image(rng: np.random.Generator, size: int = 40, label: int = 0) -> Image.Image:
    """A smooth random RGB image with a class-dependent stripe pattern (lossless as PNG)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = 2 + label
    base = np.stack(
        [
            np.sin(2 * np.pi * (freq * xx + rng.random())),
            np.cos(2 * np.pi * (freq * yy + rng.random())),
            xx * yy,
        ],
        axis=-1,
    )
    noise = rng.normal(0, 0.1, size=(size, size, 3))
    pixels = np.clip((base * 0.5 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_image_folder(root: Path, n: int = 24, size: int = 40, classes: int = 1, seed: int = 0) -> Path:
    """``root/class_k/img_i.png`` images; returns ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % classes
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        synthetic_image(rng, size, label).save(folder / f"img_{i:04d}.png")
    return root


def tiny_overrides(data_root: Path, *, iterations: int = 4, period: int = 2, extra: list[str] | None = None):
    """Overrides of configs/smoke_cpu.yaml for a fast deterministic run on a synthetic folder."""
    return [
        "data.fashion_mnist.demo=null",
        f"data.fashion_mnist.root={data_root}",
        "data.fashion_mnist.dataset_ratio=1.0",
        "train.OFFICIAL_EPOCH_LENGTH=2",
        f"optim.epochs={iterations // 2}",
        f"checkpointing.period={period}",
        "checkpointing.max_to_keep=10",
        "student.drop_path_rate=0.1",
        "train.batch_size_per_gpu=4",
        "crops.global_crops_size=16",
        "crops.local_crops_size=8",
        "train.log_period=1",
        "dtch.cls_hist_cache=64",  # windows of ~8 steps: a real window, a short warm-up
        "dtch.patch_hist_cache=200",
        *(extra or []),
    ]


def tiny_config(data_root: Path, **kwargs):
    return load_config(CONFIGS / "smoke_cpu.yaml", tiny_overrides(data_root, **kwargs))


def run_training(cfg, output_dir: Path, **kwargs) -> dict:
    """Train in this process on the CPU; returns the loop's summary."""
    from dino_bridge.distributed.device import setup_runtime
    from dino_bridge.train.loop import train

    return train(cfg, setup_runtime("cpu"), output_dir, **kwargs)


GOLDEN_THREADS = 2  # the golden run's intra-op threads (BLAS reduction order), whatever OMP_NUM_THREADS says


@contextlib.contextmanager
def golden_threads():
    """Run the golden tiny run at a fixed thread count (one BLAS reduction order), whatever
    OMP_NUM_THREADS says; the golden README says why its config keeps KoLeo well conditioned."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(GOLDEN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_metrics(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


LOSS_KEYS = (
    "dino_local_crops_loss",
    "dino_global_crops_loss",
    "ibot_loss",
    "koleo_loss_cls",
    "koleo_loss_patch",
    "total_loss",
)
