"""The training dataset: one image source + the multi-crop transform, robust to unreadable files.

An item is requested as ``(index, position)`` (from ``ShardedInfiniteSampler``). The views are drawn
from a generator derived from (seed, rank, position) only, so they do not depend on the DataLoader
worker that builds them nor on how many workers there are, and a resumed run rebuilds them exactly.

A file that fails to load (``ImageLoadError``) does not stop training: it goes into the sample's
``skipped`` list as "<file> (<reason>)" and a replacement index derived from (seed, rank, position,
attempt) is tried, up to ``max_retries`` times. The replacement sequence is deterministic, so the
batch is the same whichever process builds it. Logging is left to the trainer (once per file, from
the batch's ``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from dino_bridge.data.datasets import ImageSource
from dino_bridge.data.images import ImageLoadError
from dino_bridge.seeding import derive_seed, generator

Transform = Callable[[Image.Image, torch.Generator], dict[str, list[torch.Tensor]]]


class NoReadableImageError(RuntimeError):
    """Every attempt to find a readable image failed: the data, not the run, needs fixing."""


class SSLTrainDataset(Dataset):
    def __init__(
        self,
        source: ImageSource,
        transform: Transform,
        *,
        seed: int,
        rank: int,
        max_retries: int = 20,
    ) -> None:
        if len(source) == 0:
            raise ValueError("SSLTrainDataset: the image source is empty")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.rank = int(rank)
        self.max_retries = int(max_retries)
        # Indices that failed in this process: not re-read (the outcome is the same), still reported.
        self._known_bad: dict[int, str] = {}  # index -> why it could not be read

    def __len__(self) -> int:
        return len(self.source)

    def replacement_index(self, position: int, attempt: int) -> int:
        """The index tried at ``attempt`` (1, 2, ...) after the sampled one failed."""
        return derive_seed(self.seed, self.rank, "replacement", position, attempt) % len(self.source)

    def _load_first_readable(self, index: int, position: int) -> tuple[Image.Image, list[str]]:
        skipped: list[str] = []
        for attempt in range(self.max_retries + 1):
            candidate = index if attempt == 0 else self.replacement_index(position, attempt)
            if candidate not in self._known_bad:
                try:
                    return self.source.load(candidate), skipped
                except ImageLoadError as e:
                    self._known_bad[candidate] = e.reason
            skipped.append(f"{self.source.describe(candidate)} ({self._known_bad[candidate]})")
        raise NoReadableImageError(
            f"every attempt to load an image for stream position {position} failed "
            f"({self.max_retries + 1} attempts: index {index} and {self.max_retries} replacements). "
            f"Unreadable files: {', '.join(dict.fromkeys(skipped))}"
        )

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, position = int(item[0]), int(item[1])
        image, skipped = self._load_first_readable(index, position)
        views = self.transform(image, generator(self.seed, self.rank, "views", position))
        return {
            "global_crops": views["global_crops"],
            "local_crops": views["local_crops"],
            "position": position,
            "skipped": skipped,
        }
