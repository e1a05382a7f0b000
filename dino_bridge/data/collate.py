"""Batch the multi-crop samples and draw the iBOT masks.

Shapes: B images, G/L global/local crop size, n local crops per image, P = (G/patch)² patches,
M_m masked patches in the batch.

Output keys:
- ``global_crops`` [2B, 3, G, G], crop-major (every image's crop 1, then every image's crop 2);
- ``local_crops`` [nB, 3, L, L], crop-major, or ``None`` when n = 0;
- ``masks`` bool [2B, P], row i belongs to ``global_crops[i]``;
- ``mask_indices`` long [M_m]: flat indices of the True entries of ``masks.flatten()``;
- ``masks_weight`` float [M_m]: 1 / (masked count of the image owning that patch);
- ``n_masked_patches`` int; ``positions`` long [B]; ``skipped`` list[str]; ``batch_size`` int (B).

The masks come from a generator derived from (seed, rank, "masks", first position of the batch), so
they are the same in whichever worker builds the batch and after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dino_bridge.data.masking import sample_ibot_masks
from dino_bridge.seeding import generator


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
    ) -> None:
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
        if len(mask_ratio_min_max) != 2:
            raise ValueError(f"mask_ratio_min_max must be (min, max), got {mask_ratio_min_max}")
        self.patch_size = int(patch_size)
        self.mask_probability = float(mask_probability)
        self.mask_ratio_min_max = (float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1]))
        self.seed = int(seed)
        self.rank = int(rank)
        self.random_circular_shift = bool(random_circular_shift)
        self.dtype = dtype

    def _grid(self, global_crops: torch.Tensor) -> tuple[int, int]:
        height, width = global_crops.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"global crop size {height}×{width} is not a multiple of patch_size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        global_crops = _stack_crop_major(samples, "global_crops")
        local_crops = _stack_crop_major(samples, "local_crops")
        positions = torch.tensor([int(sample["position"]) for sample in samples], dtype=torch.long)
        grid_h, grid_w = self._grid(global_crops)

        masks = sample_ibot_masks(
            len(global_crops),
            grid_h,
            grid_w,
            mask_probability=self.mask_probability,
            ratio_min_max=self.mask_ratio_min_max,
            generator=generator(self.seed, self.rank, "masks", int(positions[0])),
            random_circular_shift=self.random_circular_shift,
        )
        mask_indices = masks.flatten().nonzero().flatten()
        masked_per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
        masks_weight = (1.0 / masked_per_image).expand_as(masks)[masks]

        if self.dtype is not None:
            global_crops = global_crops.to(self.dtype)
            local_crops = None if local_crops is None else local_crops.to(self.dtype)
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "masks": masks,
            "mask_indices": mask_indices,
            "masks_weight": masks_weight,
            "n_masked_patches": int(mask_indices.numel()),
            "positions": positions,
            "skipped": [description for sample in samples for description in sample["skipped"]],
            "batch_size": len(samples),
        }
