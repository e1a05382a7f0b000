"""The training dataset: one image source + the multi-crop transform, robust to unreadable files.

An item is requested as ``(index, position)`` (from ``ShardedInfiniteSampler``). The views are drawn
from a generator derived from (seed, rank, position) only, so they do not depend on the DataLoader
worker that builds them nor on how many workers there are, and a resumed run rebuilds them exactly.

With ``invariance`` (the Crop-Resize / PatchRoll sources, ``data/invariance.py``), a sample also
holds ``invariance``: the raw (and resize-paste) views of the two sources and their roll offsets,
each kind drawn from (seed, rank, "views", kind, position). ``invariance_kinds`` says which are built
(``"raw"`` alone, or with ``"resizepaste"``); the other views do not depend on it.

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
from dino_bridge.data.invariance import InvarianceViews
from dino_bridge.data.transforms import MultiCropAugmentation, image_to_uint8_tensor
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
        invariance: InvarianceViews | None = None,
        invariance_kinds: frozenset[str] = frozenset(),
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
        unknown = set(invariance_kinds) - {"raw", "resizepaste"}
        if unknown or (invariance_kinds and "raw" not in invariance_kinds):
            raise ValueError(
                f"invariance_kinds must be {{}}, {{raw}} or {{raw, resizepaste}}, got {set(invariance_kinds)}"
            )
        if invariance_kinds and (invariance is None or not isinstance(transform, MultiCropAugmentation)):
            raise ValueError("invariance views need InvarianceViews and a MultiCropAugmentation transform")
        self.invariance = invariance
        self.invariance_kinds = frozenset(invariance_kinds)
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
        sample: dict[str, Any] = {"position": position, "skipped": skipped}
        views_generator = generator(self.seed, self.rank, "views", position)
        if not self.invariance_kinds:
            views = self.transform(image, views_generator)
        else:
            pixels = image_to_uint8_tensor(image)
            params = self.transform.sample_params(tuple(pixels.shape[-2:]), views_generator)
            views = self.transform.apply(pixels, params, keep_geometric=True)
            sample["invariance"] = self.invariance(
                pixels,
                params,
                views["geometric_globals"],
                lambda kind: generator(self.seed, self.rank, "views", kind, position),
                resize_paste_views="resizepaste" in self.invariance_kinds,
            )
        sample["global_crops"] = views["global_crops"]
        sample["local_crops"] = views["local_crops"]
        return sample
