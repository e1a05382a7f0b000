"""Tiles of whole-slide images read on the fly with OpenSlide (``data.<name>.wsi_index``).

The index is a ``.npy`` structured array of (slide, x, y, level, size) rows (``WSI_INDEX_DTYPE``):
the tile is the ``size``×``size`` region of ``level`` whose top-left corner is (x, y) in level-0
pixels (OpenSlide's ``read_region`` convention). Relative slide paths are resolved against the
index file's folder. ``build_wsi_index`` (``dino-bridge data index-wsi``) makes one, leaving out
background tiles. The rows are memory-mapped (shared by the DataLoader workers); each process keeps
a few slides open (an LRU). A slide that fails to open fails every tile of it with an
``ImageLoadError`` whose description is the slide itself (reported once, the tiles replaced).

Transparent pixels (outside the scanned area) are composited over white. Needs ``openslide-python``
and ``openslide-bin`` (``pip install 'dino_bridge[wsi]'``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dino_bridge.data.images import ImageLoadError
from dino_bridge.data.sources.common import OpenFiles, require, write_atomic

WSI_FIELDS = ("slide", "x", "y", "level", "size")
WHITE_LEVEL = 220  # a pixel whose every channel is >= this is background (glass)
BLACK_LEVEL = 25  # ... or whose every channel is <= this (pen marks, scanner borders, voids)
ANALYSIS_PIXELS = 32  # the background test looks at each tile at about this many pixels a side


def wsi_index_dtype(max_path_length: int) -> np.dtype:
    return np.dtype(
        [
            ("slide", f"U{max(1, max_path_length)}"),
            ("x", "<i8"),
            ("y", "<i8"),
            ("level", "<i4"),
            ("size", "<i4"),
        ]
    )


def _openslide():
    return require("openslide", "wsi", "data source wsi_index")


def to_rgb(region: Image.Image) -> Image.Image:
    """OpenSlide's RGBA region over a white background, as RGB."""
    if region.mode != "RGBA":
        return region.convert("RGB")
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, region).convert("RGB")


class WSITileSource:
    """An ``ImageSource`` over the rows of a whole-slide tile index (see the module docstring)."""

    labels: list[int] | None = None
    classes: list[str] | None = None

    def __init__(self, index_path: str | os.PathLike, *, max_open_slides: int = 8) -> None:
        openslide = _openslide()
        self.index_path = os.fspath(index_path)
        if not os.path.isfile(self.index_path):
            raise ValueError(f"whole-slide tile index {self.index_path!r} does not exist (or is not a file)")
        try:
            rows = np.load(self.index_path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"whole-slide tile index {self.index_path!r} is not a .npy array: {e}") from None
        names = rows.dtype.names or ()
        if rows.ndim != 1 or any(name not in names for name in WSI_FIELDS):
            raise ValueError(
                f"whole-slide tile index {self.index_path!r} must be a 1-d structured array with fields "
                f"{', '.join(WSI_FIELDS)} (got dtype {rows.dtype}, shape {rows.shape}); "
                "build one with `dino-bridge data index-wsi`"
            )
        if len(rows) == 0:
            raise ValueError(f"whole-slide tile index {self.index_path!r} has no rows")
        self.rows = rows
        self.base_dir = os.path.dirname(os.path.abspath(self.index_path))
        self._slides = OpenFiles(openslide.OpenSlide, capacity=max_open_slides)

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, index: int) -> tuple[str, int, int, int, int]:
        row = self.rows[index]
        slide = row["slide"]
        slide = slide.decode() if isinstance(slide, bytes) else str(slide)
        return (
            os.path.join(self.base_dir, slide),
            int(row["x"]),
            int(row["y"]),
            int(row["level"]),
            int(row["size"]),
        )

    def load(self, index: int) -> Image.Image:
        path, x, y, level, size = self._row(index)
        slide = self._slides.get(path)
        name = self.describe(index)
        if not 0 <= level < slide.level_count or size <= 0:
            raise ImageLoadError(
                name, f"level {level} / size {size} invalid (slide has {slide.level_count} levels)"
            )
        try:
            region = slide.read_region((x, y), level, (size, size))
        except Exception as error:  # OpenSlideError on a corrupt tile
            raise ImageLoadError(name, f"{type(error).__name__}: {error}") from error
        return to_rgb(region)

    def describe(self, index: int) -> str:
        path, x, y, level, size = self._row(index)
        return path if path in self._slides.failed else f"{path}@x={x},y={y},level={level},size={size}"


# ------------------------------------------------------------------------------- index building
@dataclass(frozen=True)
class SlideTiles:
    slide: str
    total: int  # whole tiles of the grid
    kept: int  # not background


def background_fraction(pixels: np.ndarray) -> float:
    """The fraction of [h, w, 3] uint8 pixels that are near-white or near-black."""
    low, high = pixels.min(axis=-1), pixels.max(axis=-1)
    return float(np.mean((low >= WHITE_LEVEL) | (high <= BLACK_LEVEL)))


def slide_tiles(
    slide, tile: int, level: int, background_threshold: float
) -> tuple[list[tuple[int, int]], int]:
    """(x, y) in level-0 pixels of the whole ``tile``×``tile`` tiles of ``level`` whose background
    fraction is at most ``background_threshold``, and the number of tiles of the grid."""
    if not 0 <= level < slide.level_count:
        raise ValueError(f"level {level} does not exist (the slide has levels 0..{slide.level_count - 1})")
    width, height = slide.level_dimensions[level]
    downsample = float(slide.level_downsamples[level])
    analysis_level = max(level, slide.get_best_level_for_downsample(downsample * tile / ANALYSIS_PIXELS))
    scale = downsample / float(slide.level_downsamples[analysis_level])
    analysis_size = max(1, math.ceil(tile * scale))
    kept, total = [], 0
    for row in range(height // tile):
        for col in range(width // tile):
            total += 1
            x, y = round(col * tile * downsample), round(row * tile * downsample)
            region = to_rgb(slide.read_region((x, y), analysis_level, (analysis_size, analysis_size)))
            if background_fraction(np.asarray(region)) <= background_threshold:
                kept.append((x, y))
    return kept, total


def build_wsi_index(
    slides: Sequence[str | os.PathLike],
    *,
    tile: int = 224,
    level: int = 0,
    background_threshold: float = 0.5,
) -> tuple[np.ndarray, list[SlideTiles]]:
    """The index rows of the non-background tiles of ``slides`` (absolute paths), and per slide how
    many tiles the grid has and how many were kept. A tile is background when more than
    ``background_threshold`` of its pixels are near-white or near-black."""
    openslide = _openslide()
    if tile <= 0 or level < 0:
        raise ValueError(f"tile must be > 0 and level >= 0, got tile {tile}, level {level}")
    if not 0.0 <= background_threshold <= 1.0:
        raise ValueError(f"background_threshold must be in [0, 1], got {background_threshold}")
    rows, report = [], []
    for slide_path in slides:
        path = os.path.abspath(os.fspath(slide_path))
        try:
            slide = openslide.OpenSlide(path)
        except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            raise ValueError(f"cannot open slide {path!r}: {type(e).__name__}: {e}") from None
        with slide:
            try:
                kept, total = slide_tiles(slide, tile, level, background_threshold)
            except ValueError as e:
                raise ValueError(f"slide {path!r}: {e}") from None
        rows += [(path, x, y, level, tile) for x, y in kept]
        report.append(SlideTiles(path, total, len(kept)))
    dtype = wsi_index_dtype(max((len(r[0]) for r in rows), default=1))
    return np.array(rows, dtype=dtype), report


def save_wsi_index(rows: np.ndarray, out: str | os.PathLike) -> None:
    """Write the index ``.npy`` atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    write_atomic(os.fspath(out), buffer.getvalue())
