"""Batch the samples and draw the masks; the batch is keyed by view kind.

Shapes: B images, G/L global/local crop size, n local crops per image, R×C = P patches of a G×G
view, M masked patches of one mask kind.

Output::

    views:  global [2B, 3, G, G] (crop-major: every image's crop 1, then every image's crop 2),
            local [nB, 3, L, L] (absent when n = 0), and when the samples carry invariance views
            raw_r, raw_o, resizepaste_r, resizepaste_o [B, 3, G, G]
    masks:  MaskSet per kind: global [2B, P] (iBOT), and with the invariance views
            resizepaste_r/o and shift_r/o [B, P] (student input masks, drawn like the iBOT masks)
            and align [B, P] (the sparse PatchRoll alignment set, one per step, shared by r and o)
    rolls:  r, o long [B, 2]: the PatchRoll offsets (dr, dc) in patches
    positions long [B]; skipped list[str]; batch_size int (B)

Every mask kind comes from its own generator derived from (seed, rank, "masks", kind, first position
of the batch) — the iBOT masks from (seed, rank, "masks", first position), as before the invariance
views existed — so a mask never depends on the worker that builds the batch, on a resume, or on
which other kinds are drawn. Counts are exact every step (DTCH windows stay valid). With
``use_all_shift_mask=False`` the shift masks keep away from the alignment set (same exact counts),
so every aligned position is one the student saw unmasked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from dino_bridge.data.invariance import SOURCES
from dino_bridge.data.masking import avoid_positions_, sample_ibot_masks
from dino_bridge.seeding import generator


class MaskSet(NamedTuple):
    """One kind of mask for n images: ``masks`` bool [n, P], ``indices`` long [M] (flat positions of
    the True entries of ``masks.flatten()``), ``weights`` float [M] = 1 / (count of the owning image)."""

    masks: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    @classmethod
    def of(cls, masks: torch.Tensor) -> MaskSet:
        per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
        return cls(masks, masks.flatten().nonzero().flatten(), (1.0 / per_image).expand_as(masks)[masks])


def _stack_crop_major(samples: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
    num_crops = len(samples[0][key])
    if any(len(sample[key]) != num_crops for sample in samples):
        raise ValueError(f"samples disagree on the number of {key}")
    if num_crops == 0:
        return None
    return torch.stack([sample[key][crop] for crop in range(num_crops) for sample in samples])


class MultiCropCollate:
    def __init__(
        self,
        *,
        patch_size: int,
        mask_probability: float,
        mask_ratio_min_max: Sequence[float],
        seed: int,
        rank: int,
        random_circular_shift: bool = False,
        dtype: torch.dtype | None = None,
        align_probability: float = 0.5,
        align_ratio_min_max: Sequence[float] = (0.05, 0.15),
        use_all_shift_mask: bool = True,
    ) -> None:
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        for name, value in (("mask_probability", mask_probability), ("align_probability", align_probability)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, pair in (
            ("mask_ratio_min_max", mask_ratio_min_max),
            ("align_ratio_min_max", align_ratio_min_max),
        ):
            if len(pair) != 2:
                raise ValueError(f"{name} must be (min, max), got {pair}")
        self.patch_size = int(patch_size)
        self.mask_probability = float(mask_probability)
        self.mask_ratio_min_max = (float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1]))
        self.seed = int(seed)
        self.rank = int(rank)
        self.random_circular_shift = bool(random_circular_shift)
        self.dtype = dtype
        self.align_probability = float(align_probability)
        self.align_ratio_min_max = (float(align_ratio_min_max[0]), float(align_ratio_min_max[1]))
        self.use_all_shift_mask = bool(use_all_shift_mask)

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"global crop size {height}×{width} is not a multiple of patch_size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def _masks(self, n_images: int, grid: tuple[int, int], first: int, *kind: str, **options) -> torch.Tensor:
        return sample_ibot_masks(
            n_images,
            *grid,
            mask_probability=options.pop("mask_probability", self.mask_probability),
            ratio_min_max=options.pop("ratio_min_max", self.mask_ratio_min_max),
            generator=generator(self.seed, self.rank, "masks", *kind, first),
            random_circular_shift=options.pop("random_circular_shift", self.random_circular_shift),
            **options,
        )

    def _invariance(self, samples, grid, first: int, views: dict, masks: dict) -> dict[str, torch.Tensor]:
        """The invariance views, their masks, the alignment set and the roll offsets."""
        n_images, num_patches = len(samples), grid[0] * grid[1]
        kinds = samples[0]["invariance"].keys()
        for kind in kinds:
            if not kind.startswith("roll_"):
                views[kind] = torch.stack([sample["invariance"][kind] for sample in samples])
        align = self._masks(
            n_images,
            grid,
            first,
            "align",
            mask_probability=self.align_probability,
            ratio_min_max=self.align_ratio_min_max,
            max_block_patches=max(1, int(num_patches * self.align_ratio_min_max[1])),
            random_circular_shift=False,
        )
        masks["align"] = MaskSet.of(align)
        for source in SOURCES:
            if f"resizepaste_{source}" in kinds:
                masks[f"resizepaste_{source}"] = MaskSet.of(
                    self._masks(n_images, grid, first, f"resizepaste_{source}")
                )
            shift = self._masks(n_images, grid, first, f"shift_{source}")
            if not self.use_all_shift_mask:
                avoid_positions_(
                    shift, align, generator(self.seed, self.rank, "masks", "shift_avoid", source, first)
                )
            masks[f"shift_{source}"] = MaskSet.of(shift)
        return {
            source: torch.stack([sample["invariance"][f"roll_{source}"] for sample in samples])
            for source in SOURCES
        }

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        global_crops = _stack_crop_major(samples, "global_crops")
        local_crops = _stack_crop_major(samples, "local_crops")
        positions = torch.tensor([int(sample["position"]) for sample in samples], dtype=torch.long)
        grid = self._grid(global_crops)
        first = int(positions[0])

        views: dict[str, torch.Tensor] = {"global": global_crops}
        if local_crops is not None:
            views["local"] = local_crops
        # the iBOT masks keep the generator they had before other kinds existed (no kind in its key)
        masks = {"global": MaskSet.of(self._masks(len(global_crops), grid, first))}
        batch: dict[str, Any] = {"views": views, "masks": masks}
        if "invariance" in samples[0]:
            if any("invariance" not in sample for sample in samples):
                raise ValueError("samples disagree on the invariance views")
            batch["rolls"] = self._invariance(samples, grid, first, views, masks)
        if self.dtype is not None:
            for kind, images in views.items():
                views[kind] = images.to(self.dtype)
        batch.update(
            positions=positions,
            skipped=[description for sample in samples for description in sample["skipped"]],
            batch_size=len(samples),
        )
        return batch
