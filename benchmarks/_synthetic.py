"""Synthetic training images for the benchmarks: random textures written as JPEGs, plus a txt list.

Each image is a sum of a few random sinusoidal gratings, a smooth low-frequency colour field and
pixel noise, so the multi-crop pipeline (random resized crops, colour jitter, blur, solarisation)
does the same work it does on photos of the same size, decoding included. The content is random:
these images are for timing, never for quality.

    python benchmarks/_synthetic.py --out /tmp/bench_images --count 256 --size 256
    # prints the path of the txt list (data.<name>.txt_path)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

LIST_NAME = "images.txt"


def random_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: gratings + a smooth colour field + noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), dtype=np.float32)
    for _ in range(int(rng.integers(2, 6))):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(1, 24), rng.uniform(0, 2 * np.pi)
        grating = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        image += grating[..., None] * rng.uniform(-0.5, 0.5, size=3).astype(np.float32)
    coarse = rng.uniform(0, 1, size=(4, 4, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
    image = 0.5 * image / max(1.0, float(np.abs(image).max())) + field.astype(np.float32) / 255.0
    image += rng.normal(0, 0.05, size=image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_synthetic_images(
    folder: str | os.PathLike, count: int = 256, size: int = 256, seed: int = 0
) -> Path:
    """Write ``count`` JPEGs of ``size``² under ``folder`` (reused when the list is already there).

    Returns the txt list (one relative path per line), usable as ``data.<name>.txt_path``.
    """
    if count < 1 or size < 8:
        raise ValueError(f"need count >= 1 and size >= 8, got count={count}, size={size}")
    folder = Path(folder)
    listing = folder / LIST_NAME
    names = [f"img_{i:05d}.jpg" for i in range(count)]
    if (
        listing.is_file()
        and listing.read_text().split() == names
        and all((folder / n).is_file() for n in names)
    ):
        return listing
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(random_texture(rng, size), "RGB").save(folder / name, quality=90)
    listing.write_text("\n".join(names) + "\n")
    return listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the images and images.txt")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_synthetic_images(args.out, args.count, args.size, args.seed))


if __name__ == "__main__":
    main()
