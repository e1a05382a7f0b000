"""PCA of patch features as colours (the DINO papers' pictures): pure functions, no model.

Legend: N images, P patches per image (P = h·w, the patch grid), D width, k components.
The patch tokens of all N images are pooled (N·P rows), centred, and projected on their first k
principal directions (SVD of the centred rows); each component is min-max scaled to [0, 1] over the
pooled rows, so one colour means one thing across the images. Components 1-3 are R, G, B.

Foreground (optional, as in DINOv2's figures): the first component often separates object from
background. ``foreground_threshold`` keeps the patches whose scaled first component exceeds it,
paints the others black and refits the PCA on the kept patches alone, so all three colours describe
the object. The sign of a principal direction is arbitrary; the first one is oriented so that the
patches on the border of the grid score lower on average (the border is usually background).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

MARGIN = 4  # white pixels between and around the cells of a panel
MIN_CELL = 224  # a cell (one image or its PCA map) is shown at least this many pixels wide


def principal_components(rows: torch.Tensor, k: int = 3) -> torch.Tensor:
    """[M, D] → [M, k]: the rows' coordinates on their first k principal directions (centred SVD).

    Each direction's sign is fixed so that its largest loading is positive (deterministic); fewer
    than k directions (M or D < k) are padded with zero columns."""
    rows = rows.double()
    centred = rows - rows.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: [min(M, D), D]
    directions = vh[:k]
    largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
    directions = directions * torch.where(largest < 0, -1.0, 1.0).to(directions)
    coords = centred @ directions.T
    if coords.shape[1] < k:
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], k - coords.shape[1])], dim=1)
    return coords


def min_max_scale(values: torch.Tensor) -> torch.Tensor:
    """[M, k] → [M, k] in [0, 1], per column; a constant column becomes 0.5."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    span = high - low
    scaled = (values - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.full_like(scaled, 0.5))


def border_mask(grid: tuple[int, int]) -> torch.Tensor:
    """[h·w] bool: the patches on the outer ring of an h×w grid."""
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask.flatten()


def pca_rgb(
    patch_tokens: torch.Tensor, grid: tuple[int, int], foreground_threshold: float | None = None
) -> np.ndarray:
    """Patch tokens [N, P, D] (or [P, D]) on an h×w grid (P = h·w) → uint8 RGB maps [N, h, w, 3].

    The first three principal components of all N·P tokens together, min-max scaled, as R, G, B.
    With ``foreground_threshold`` in (0, 1), patches whose scaled first component is at most the
    threshold are black and the colours come from a PCA of the remaining patches (module docstring)."""
    tokens = patch_tokens if patch_tokens.dim() == 3 else patch_tokens.unsqueeze(0)
    n, p, d = tokens.shape
    h, w = grid
    if p != h * w:
        raise ValueError(f"{p} patch tokens per image do not fill a {h}x{w} grid")
    if foreground_threshold is not None and not 0.0 < foreground_threshold < 1.0:
        raise ValueError(f"the foreground threshold must lie in (0, 1), got {foreground_threshold}")
    rows = tokens.reshape(n * p, d)
    first = principal_components(rows, k=1)[:, 0]
    if first.reshape(n, p)[:, border_mask(grid)].mean() > first.mean():
        first = -first  # border (background) low: keeps the foreground on the high side
    colours = torch.zeros(n * p, 3, dtype=torch.float64)
    if foreground_threshold is None:
        coords = principal_components(rows, k=3)
        coords[:, 0] = first
        colours = min_max_scale(coords)
    else:
        keep = min_max_scale(first[:, None])[:, 0] > foreground_threshold
        if keep.any():
            coords = principal_components(rows[keep], k=3)
            colours[keep] = min_max_scale(coords)
    return (colours * 255).round().to(torch.uint8).reshape(n, h, w, 3).numpy()


def cell_size(image_size: int) -> int:
    """The displayed size of a cell: the smallest multiple of ``image_size`` that is >= MIN_CELL
    (so the nearest-neighbour upsampling of the patch grid stays an integer factor)."""
    return image_size * math.ceil(MIN_CELL / image_size)


def view_like_eval(image: Image.Image, size: int, resize_ratio: float) -> Image.Image:
    """The region the eval transform sees (short side to size·ratio, centre crop), at ``size`` px."""
    image = image.convert("RGB")
    short = round(size * resize_ratio)
    scale = short / min(image.size)
    resized = image.resize(
        (max(short, round(image.width * scale)), max(short, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = round((resized.width - size) / 2), round((resized.height - size) / 2)
    return resized.crop((left, top, left + size, top + size))


def pca_panel(images: list[Image.Image], maps: np.ndarray, cell: int) -> Image.Image:
    """One row per image: the image (already cropped square, shown at ``cell`` px) next to its PCA
    map [h, w, 3] upsampled (nearest) to ``cell`` px; white margins of MARGIN px.

    Size: (2·cell + 3·MARGIN) × (N·cell + (N + 1)·MARGIN)."""
    if len(images) != len(maps):
        raise ValueError(f"{len(images)} images but {len(maps)} PCA maps")
    n = len(images)
    panel = Image.new("RGB", (2 * cell + 3 * MARGIN, n * cell + (n + 1) * MARGIN), "white")
    for i, (image, rgb) in enumerate(zip(images, maps)):
        top = MARGIN + i * (cell + MARGIN)
        panel.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), (MARGIN, top))
        pca = Image.fromarray(np.ascontiguousarray(rgb), "RGB").resize((cell, cell), Image.Resampling.NEAREST)
        panel.paste(pca, (2 * MARGIN + cell, top))
    return panel
