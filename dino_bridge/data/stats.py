"""Per-channel mean and std of an image source over a seeded sample (for ``crops.rgb_mean/std``).

Pixels are scaled to [0, 1]; the statistics are over every pixel of the sampled images (a large
image weighs more), accumulated in float64 as sums of x and x². Unreadable items are skipped and
counted, not replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dino_bridge.data.datasets import ImageSource
from dino_bridge.data.images import ImageLoadError
from dino_bridge.seeding import generator


@dataclass(frozen=True)
class ChannelStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    images: int  # images used
    pixels: int
    skipped: list[str]  # descriptions of the items that could not be read

    def overrides(self, decimals: int = 4) -> str:
        """``crops.rgb_mean=[…] crops.rgb_std=[…]``: paste-able as ``key=value`` overrides."""

        def fmt(values):
            return "[" + ",".join(f"{v:.{decimals}f}" for v in values) + "]"

        return f"crops.rgb_mean={fmt(self.mean)} crops.rgb_std={fmt(self.std)}"


def sample_indices(size: int, samples: int, seed: int) -> list[int]:
    """``min(samples, size)`` distinct indices, a pure function of (size, samples, seed)."""
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    order = torch.randperm(size, generator=generator(seed, "channel_stats"))
    return sorted(order[: min(samples, size)].tolist())


def channel_stats(source: ImageSource, samples: int, seed: int = 0) -> ChannelStats:
    total = np.zeros(3)
    squares = np.zeros(3)
    pixels, used, skipped = 0, 0, []
    for index in sample_indices(len(source), samples, seed):
        try:
            image = source.load(index)
        except ImageLoadError as e:
            skipped.append(f"{source.describe(index)} ({e.reason})")
            continue
        values = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        total += values.sum(axis=0)
        squares += np.square(values).sum(axis=0)
        pixels += values.shape[0]
        used += 1
    if used == 0:
        raise ValueError(f"none of the {len(skipped)} sampled images could be read: {', '.join(skipped[:5])}")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    return ChannelStats(tuple(mean.tolist()), tuple(std.tolist()), used, pixels, skipped)
