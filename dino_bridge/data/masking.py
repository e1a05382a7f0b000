"""iBOT block masks with exact patch counts.

Shapes: M images (global crops of a rank), a patch grid of R×C = P patches.

``MaskingGenerator`` is the BEiT block-wise algorithm driven by an explicit ``torch.Generator``: place
random rectangles (area U(min_num_patches, min(remaining, max_num_patches)), aspect log-uniform in
[min_aspect, max_aspect], up to 10 attempts per block, a block is kept only when the new patches it adds
number between 1 and the remaining budget), then top up with random single patches, so the mask always
holds exactly the requested count.

``sample_ibot_masks`` chooses the per-image counts as the reference does (METHOD §2): n = ⌊M·p⌋ masked
images with ratios linspace(r_min, r_max, n+1)[1:] and ⌊P·ratio⌋ patches each, so the total count is
the same every step (3 771 for M = 128, P = 196, p = 0.5, (0.1, 0.5)).
"""

from __future__ import annotations

import math

import torch

# ⌊P·ratio⌋ is computed in float64 plus this epsilon, so a product that is an integer in exact arithmetic
# (e.g. 196·0.5, or 10·0.3 = 2.9999999999999996 in floats) is not floored one below it. Ratios given with a
# few decimals never have a true fractional part within 1e-6 of 1, so the epsilon cannot round up a
# genuinely fractional product.
_FLOOR_EPSILON = 1e-6


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    unit = torch.rand(1, generator=generator, dtype=torch.float64).item()
    return low + (high - low) * unit


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive, like ``random.randint``)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


class MaskingGenerator:
    """Block-wise boolean masks on a ``grid_h × grid_w`` patch grid."""

    def __init__(
        self,
        grid_h: int,
        grid_w: int,
        *,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if grid_h <= 0 or grid_w <= 0:
            raise ValueError(f"mask grid must be positive, got {grid_h}×{grid_w}")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
            raise ValueError(f"mask aspect range invalid: min_aspect={min_aspect}, max_aspect={max_aspect}")
        self.grid_h, self.grid_w = int(grid_h), int(grid_w)
        self.num_patches = self.grid_h * self.grid_w
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_patches if max_num_patches is None else int(max_num_patches)
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: torch.Tensor, max_new_patches: int, generator: torch.Generator) -> int:
        """Try (up to 10 times) to add one rectangle adding 1..max_new_patches patches; return how many."""
        for _ in range(10):
            target_area = _uniform(generator, self.min_num_patches, max_new_patches)
            aspect_ratio = math.exp(_uniform(generator, *self.log_aspect_range))
            height = int(round(math.sqrt(target_area * aspect_ratio)))
            width = int(round(math.sqrt(target_area / aspect_ratio)))
            # Strict `<` as in BEiT: a block never spans the whole grid in one direction.
            if 0 < width < self.grid_w and 0 < height < self.grid_h:
                top = _randint(generator, 0, self.grid_h - height)
                left = _randint(generator, 0, self.grid_w - width)
                window = mask[top : top + height, left : left + width]
                new_patches = height * width - int(window.sum())
                if 0 < new_patches <= max_new_patches:
                    window.fill_(True)
                    return new_patches
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> torch.Tensor:
        """A bool [grid_h, grid_w] mask with exactly ``num_masking_patches`` True entries."""
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}"
            )
        mask = torch.zeros(self.grid_h, self.grid_w, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, generator)
            if added == 0:
                break
            count += added
        missing = num_masking_patches - count
        if missing > 0:
            free = (~mask).flatten().nonzero().flatten()
            chosen = free[torch.randperm(len(free), generator=generator)[:missing]]
            mask.view(-1)[chosen] = True
        assert int(mask.sum()) == num_masking_patches
        return mask


def num_masked_patches_per_image(
    n_images: int, num_patches: int, mask_probability: float, ratio_min_max: tuple[float, float]
) -> list[int]:
    """The target counts of the masked images: ⌊P·r_i⌋ for r = linspace(r_min, r_max, n+1)[1:]."""
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    ratio_min, ratio_max = (float(v) for v in ratio_min_max)
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {tuple(ratio_min_max)}")
    n_masked = int(math.floor(n_images * mask_probability + _FLOOR_EPSILON))
    counts = []
    for i in range(1, n_masked + 1):
        ratio = ratio_min + (ratio_max - ratio_min) * i / n_masked
        counts.append(min(num_patches, int(math.floor(num_patches * ratio + _FLOOR_EPSILON))))
    return counts


def sample_ibot_masks(
    n_images: int,
    grid_h: int,
    grid_w: int,
    *,
    mask_probability: float,
    ratio_min_max: tuple[float, float],
    generator: torch.Generator,
    random_circular_shift: bool = False,
    max_block_patches: int | None = None,
) -> torch.Tensor:
    """Bool [M, P] masks for M = ``n_images`` global crops (see the module docstring).

    Blocks are capped at ``max_block_patches`` (default 0.5·P, as the reference). The masked images
    come first, then the unmasked ones, and the list is shuffled; with ``random_circular_shift``
    each 2-D mask is rolled by a random (dy, dx).
    """
    num_patches = grid_h * grid_w
    counts = num_masked_patches_per_image(n_images, num_patches, mask_probability, ratio_min_max)
    cap = int(0.5 * num_patches) if max_block_patches is None else int(max_block_patches)
    masking = MaskingGenerator(grid_h, grid_w, max_num_patches=cap)
    masks = torch.zeros(n_images, grid_h, grid_w, dtype=torch.bool)
    for i, count in enumerate(counts):
        masks[i] = masking(count, generator)
    masks = masks[torch.randperm(n_images, generator=generator)]
    if random_circular_shift:
        for i in range(n_images):
            shift_y = _randint(generator, 0, grid_h - 1)
            shift_x = _randint(generator, 0, grid_w - 1)
            masks[i] = torch.roll(masks[i], shifts=(shift_y, shift_x), dims=(0, 1))
    return masks.reshape(n_images, num_patches)


def avoid_positions_(
    masks: torch.Tensor, forbidden: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Move the masked entries of ``masks`` [M, P] that fall on ``forbidden`` [M, P] to random
    free, allowed positions of the same row, in place: every row keeps its exact count and no
    longer touches ``forbidden``. Raises if a row has not enough allowed positions."""
    for i in range(masks.shape[0]):
        clash = masks[i] & forbidden[i]
        moved = int(clash.sum())
        if moved == 0:
            continue
        masks[i] &= ~forbidden[i]
        free = (~masks[i] & ~forbidden[i]).nonzero().flatten()
        if len(free) < moved:
            raise ValueError(
                f"cannot keep {int(masks[i].sum()) + moved} masked patches of {masks.shape[1]} away from "
                f"{int(forbidden[i].sum())} reserved positions"
            )
        masks[i, free[torch.randperm(len(free), generator=generator)[:moved]]] = True
    return masks
