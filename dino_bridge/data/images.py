"""Decode one image file into an 8-bit RGB ``PIL.Image``, or fail with a clear ``ImageLoadError``.

Every mode Pillow can open is mapped to RGB without clipping information away:
- 16-bit integer images (``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` and ``I`` holding values in
  [0, 65535]) are *scaled* to 8 bits (x / 257, rounded), so a 16-bit photo keeps its contrast
  instead of saturating at 255; ``I`` images outside that range are min/max scaled.
- 32-bit float images (``F``) are min/max scaled to [0, 255] (a constant image becomes black).
- Images with alpha (``RGBA``, ``LA``, ``PA``, palette with transparency, ...) are composited over
  a white background, so transparent pixels do not reveal whatever colour the encoder stored there.
- EXIF orientation is applied, and the pixels are fully decoded here so a truncated file fails at
  load time, not later inside a transform.

Reduced-size JPEG decoding (``draft_min_side`` > 0, opt-in: it changes pixels): a JPEG is decoded
by libjpeg at the smallest DCT scale (1, 1/2, 1/4 or 1/8) whose shorter side is still at least
``draft_min_side`` pixels (Pillow's ``Image.draft``); other formats are decoded in full.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16BS", "I;16LS", "I;16S")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(OSError):
    """An image file that cannot be used: missing, empty, not an image, truncated, too large, ...

    ``path`` and ``reason`` are kept as attributes; the message names both.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path!r}: {reason}")

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        # The default exception pickling would call ImageLoadError(message): keep both fields.
        return (type(self), (self.path, self.reason))


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)


def _min_max_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Map any Pillow mode to RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_to_uint8(np.asarray(image))
        return Image.fromarray(gray).convert("RGB")
    if mode == "I":
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            gray = _sixteen_bit_to_uint8(values)
        else:
            gray = _min_max_to_uint8(values)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        return Image.fromarray(_min_max_to_uint8(np.asarray(image))).convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, P, 1, CMYK, YCbCr, RGBX, HSV ...: Pillow's own conversion is exact enough.
    return image.convert("RGB")


def load_image(path: str | os.PathLike, draft_min_side: int = 0) -> Image.Image:
    """Open, fully decode, orient (EXIF) and convert ``path`` to an RGB image (``draft_min_side``:
    see the module docstring).

    Raises ``ImageLoadError`` (an ``OSError``) naming the file and the reason for every failure.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(path, "file does not exist")
    if os.path.isdir(path):
        raise ImageLoadError(path, "is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    return _decode(path, path, draft_min_side)


def decode_image(data: bytes, name: str, draft_min_side: int = 0) -> Image.Image:
    """``load_image`` for the bytes of an image file (a member of an archive); ``name`` is what an
    ``ImageLoadError`` names."""
    if not data:
        raise ImageLoadError(name, "file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, draft_min_side)


def draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The (W, H) to ask ``Image.draft`` for so that the shorter side stays >= ``min_side``."""
    width, height = size
    factor = min_side / min(width, height)
    return max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))


def _decode(source: str | io.BytesIO, name: str, draft_min_side: int = 0) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) about some benign oddities, e.g. palette transparency.
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(source) as opened:
                if draft_min_side > 0 and opened.format == "JPEG":
                    opened.draft("RGB", draft_size(opened.size, draft_min_side))
                opened.load()
                oriented = ImageOps.exif_transpose(opened)
                rgb = _to_rgb(oriented)
                rgb.load()
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"decompression bomb: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(name, "not a recognised image format") from error
    except Exception as error:
        # Truncated data ("image file is truncated"), broken headers or EXIF, unsupported modes, and
        # whatever else a format plugin raises on a malformed file: one bad file must not stop training.
        raise ImageLoadError(name, f"{type(error).__name__}: {error}") from error
    # Detach from the file handle that the `with` block closed.
    return rgb if rgb is not opened else rgb.copy()
