"""Geometry of the invariance views (METHOD §4): ResizePaste (Crop-Resize) and PatchRoll.

Legend: S source size (square, a multiple of the patch size p), R×C = P patch grid of an S×S
image, B images, D width.

ResizePaste: crop a box of the source (with probability ``crop_probability``, sides U(crop_scale)
of S; else the whole source), resize it (bicubic, antialias) to a paste size that is a multiple of
p, and paste it at a patch-aligned position onto a canvas of one uniform grey. Only the CLS is
aligned with the teacher's view of the source, so no patch correspondence is kept.

PatchRoll: a circular roll by (p·dr, p·dc) pixels, (dr, dc) uniform in [−m, m] patches. The
content of source patch i = r·C + c lands at student position

    perm[i] = ((r + dr) mod R)·C + ((c + dc) mod C),

so the teacher token for student position j is the source token inv[j] with inv[perm[i]] = i.
A roll moves whole patches, so it is exact; it runs on the device on the normalised source
(``roll_images``), and only the offsets travel with the batch.

Every draw comes from the ``torch.Generator`` passed in, a fixed number of draws per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino_bridge.data.transforms import CropBox


@dataclass(frozen=True)
class ResizePasteParams:
    crop: CropBox  # the part of the source that is resized
    paste: CropBox  # where it lands on the canvas (patch-aligned, sides multiples of p)
    grey: float  # the canvas value in [0, 1], the same on every channel


def _check_range(name: str, pair: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    a, b = float(pair[0]), float(pair[1])
    if not low < a <= b <= high:
        raise ValueError(f"{name} must satisfy {low} < min <= max <= {high}, got {tuple(pair)}")
    return a, b


def _snap_down(value: float, patch: int) -> int:
    """The largest multiple of ``patch`` not above ``value``, at least ``patch``."""
    return max(patch, patch * int(math.floor(value / patch)))


def sample_resize_paste(
    size: int,
    patch: int,
    generator: torch.Generator,
    *,
    crop_probability: float = 0.7,
    crop_scale: tuple[float, float] = (0.7, 1.0),
    paste_ratio: tuple[float, float] = (0.5, 0.9),
    keep_aspect_probability: float = 0.3,
) -> ResizePasteParams:
    """The ResizePaste geometry for an S×S source (S = ``size``); 11 uniforms per call."""
    if size % patch:
        raise ValueError(
            f"ResizePaste needs a source size that is a multiple of the patch, got {size}, {patch}"
        )
    crop_low, crop_high = _check_range("crop_scale", crop_scale, 0.0, 1.0)
    ratio_low, ratio_high = _check_range("paste_ratio", paste_ratio, 0.0, 1.0)
    (u_crop, u_fh, u_fw, u_top, u_left, u_keep, u_rh, u_rw, u_grey, u_y, u_x) = torch.rand(
        11, generator=generator, dtype=torch.float64
    ).tolist()
    if u_crop < crop_probability:
        crop_h = max(1, round(size * (crop_low + (crop_high - crop_low) * u_fh)))
        crop_w = max(1, round(size * (crop_low + (crop_high - crop_low) * u_fw)))
        crop = CropBox(int(u_top * (size - crop_h + 1)), int(u_left * (size - crop_w + 1)), crop_h, crop_w)
    else:
        crop = CropBox(0, 0, size, size)
    paste_h = _snap_down(round(size * (ratio_low + (ratio_high - ratio_low) * u_rh)), patch)
    if u_keep < keep_aspect_probability:
        paste_w = paste_h  # the source is square: keeping its aspect means a square paste
    else:
        paste_w = _snap_down(round(size * (ratio_low + (ratio_high - ratio_low) * u_rw)), patch)
    top = patch * (int(u_y * (size - paste_h + 1)) // patch)
    left = patch * (int(u_x * (size - paste_w + 1)) // patch)
    return ResizePasteParams(crop, CropBox(top, left, paste_h, paste_w), u_grey)


def _resized_crop(image: torch.Tensor, box: CropBox, height: int, width: int) -> torch.Tensor:
    return TF.resized_crop(
        image,
        box.top,
        box.left,
        box.height,
        box.width,
        [height, width],
        interpolation=InterpolationMode.BICUBIC,
        antialias=True,
    )


def resize_paste(
    image: torch.Tensor,
    params: ResizePasteParams,
    resized_crop: Callable[[torch.Tensor, CropBox, int, int], torch.Tensor] = _resized_crop,
) -> torch.Tensor:
    """[3, S, S] float in [0, 1] → the ResizePaste view (same shape and dtype; not clamped, so
    bicubic over- and undershoot survive, as in the reference). ``resized_crop(image, box, h, w)``:
    bicubic antialiased (the view pipeline's own, ``transforms.pixel_pipeline``)."""
    crop, paste = params.crop, params.paste
    block = resized_crop(image, crop, paste.height, paste.width)
    canvas = torch.full_like(image, params.grey)
    canvas[:, paste.top : paste.top + paste.height, paste.left : paste.left + paste.width] = block
    return canvas


def sample_roll(max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """(dr, dc) uniform in [−max_shift, max_shift] patches: long [2]."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    return torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)


def roll_permutation(grid_h: int, grid_w: int, rolls: torch.Tensor) -> torch.Tensor:
    """perm [B, P]: the student position where source patch i lands, for rolls [B, 2] = (dr, dc)."""
    rows = torch.arange(grid_h, device=rolls.device).repeat_interleave(grid_w)  # r of patch i
    cols = torch.arange(grid_w, device=rolls.device).repeat(grid_h)  # c of patch i
    new_rows = (rows[None] + rolls[:, :1]) % grid_h
    new_cols = (cols[None] + rolls[:, 1:]) % grid_w
    return new_rows * grid_w + new_cols


def inverse_roll_permutation(grid_h: int, grid_w: int, rolls: torch.Tensor) -> torch.Tensor:
    """inv [B, P]: the source patch whose content sits at student position j (inv[perm[i]] = i)."""
    return roll_permutation(grid_h, grid_w, -rolls)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, ch, R·p, C·p] → [B, P, ch·p·p] in row-major patch order (the patch embedding's order)."""
    b, ch, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(b, ch, grid_h, patch, grid_w, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, grid_h * grid_w, ch * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The inverse of ``patchify``: [B, P, ch·p·p] → [B, ch, R·p, C·p]."""
    b, _, flat = patches.shape
    ch = flat // (patch * patch)
    x = patches.reshape(b, grid_h, grid_w, ch, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch, grid_h * patch, grid_w * patch)


def roll_images(images: torch.Tensor, rolls: torch.Tensor, patch: int) -> torch.Tensor:
    """Roll each image [B, ch, H, W] circularly by (p·dr, p·dc) pixels (rolls [B, 2]), batched.

    Equal to ``torch.roll(images[b], (p·dr, p·dc), dims=(-2, -1))`` for every b: the student
    patch j of the result is the source patch inv[j].
    """
    grid_h, grid_w = images.shape[-2] // patch, images.shape[-1] // patch
    if images.shape[-2] % patch or images.shape[-1] % patch:
        raise ValueError(f"images {tuple(images.shape)} are not a multiple of the patch size {patch}")
    inv = inverse_roll_permutation(grid_h, grid_w, rolls.to(images.device))
    patches = patchify(images, patch)
    rolled = torch.gather(patches, 1, inv.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return unpatchify(rolled, patch, grid_h, grid_w)


def aligned_token_rows(
    selected: torch.Tensor, rolls: torch.Tensor, grid_h: int, grid_w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices into [B·P] token matrices for the sparse PatchRoll alignment.

    ``selected`` bool [B, P] marks student positions j of the rolled images. Returns
    (student_rows, teacher_rows), each long [N]: row b·P + j of the rolled image's tokens pairs
    with row b·P + inv[b, j] of the source image's tokens, in row-major order of (b, j).
    """
    num_patches = grid_h * grid_w
    inv = inverse_roll_permutation(grid_h, grid_w, rolls.to(selected.device))  # [B, P]
    offsets = torch.arange(selected.shape[0], device=selected.device)[:, None] * num_patches
    student_rows = (offsets + torch.arange(num_patches, device=selected.device)[None])[selected]
    teacher_rows = (offsets + inv)[selected]
    return student_rows, teacher_rows
