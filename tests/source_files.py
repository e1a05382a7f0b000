"""Small files of every file-backed source, made by the tests: HDF5 tile stores, pyramidal tiled
TIFFs (read by OpenSlide as generic-tiff), WebDataset tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from tests.helpers import synthetic_image


def tiles(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] smooth random tiles."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(synthetic_image(rng, size, label=i % 3)) for i in range(n)])


def write_h5(path: Path, pixels: np.ndarray, key: str = "patches", chunked: bool = False) -> Path:
    import h5py

    with h5py.File(path, "w") as handle:
        if chunked:  # one gzip chunk per tile: a corrupt chunk fails that tile alone
            handle.create_dataset(key, data=pixels, chunks=(1, *pixels.shape[1:]), compression="gzip")
        else:
            handle.create_dataset(key, data=pixels)
    return path


def corrupt_h5_tiles(path: Path, tile_numbers: list[int], key: str = "patches") -> None:
    """Overwrite the stored chunks of these tiles (a chunked file) with garbage."""
    import h5py

    with h5py.File(path, "r") as handle:
        infos = [handle[key].id.get_chunk_info_by_coord((t, 0, 0, 0)) for t in tile_numbers]
    with open(path, "r+b") as raw:
        for info in infos:
            raw.seek(info.byte_offset)
            raw.write(b"\xff" * info.size)


def make_h5_store(root: Path, counts=(10, 8), size: int = 24, garbage: bool = True) -> tuple[Path, list]:
    """``root/list.txt`` listing ``len(counts)`` HDF5 files (and a garbage ``broken.h5``); returns the
    list and the tiles of each good file."""
    root.mkdir(parents=True, exist_ok=True)
    stored, names = [], []
    for k, count in enumerate(counts):
        pixels = tiles(count, size, seed=k)
        write_h5(root / f"part{k}.h5", pixels)
        stored.append(pixels)
        names.append(f"part{k}.h5")
    if garbage:
        (root / "broken.h5").write_bytes(b"this is not an HDF5 file\n" * 20)
        names.append("broken.h5")
    listing = root / "list.txt"
    listing.write_text("# tiles\n" + "\n".join(names) + "\n")
    return listing, stored


def write_pyramid_tiff(path: Path, pixels: np.ndarray, levels: int = 2, tile: int = 32) -> list[np.ndarray]:
    """A tiled, pyramidal, lossless (deflate) RGB TIFF: level k is ``pixels[::2**k, ::2**k]``.
    OpenSlide reads it as a generic tiled TIFF. Returns the pixels of every level."""
    import tifffile

    pyramid = [np.ascontiguousarray(pixels[:: 2**k, :: 2**k]) for k in range(levels)]
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(pyramid):
            tif.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if k == 0 else 1,
                metadata=None,
            )
    return pyramid


def slide_pixels(height: int = 128, width: int = 160, seed: int = 0) -> np.ndarray:
    """Tissue-like texture in the left part, white glass on the right, a black bar at the bottom."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    pixels[:, : width // 2] = rng.integers(90, 200, (height, width // 2, 3), dtype=np.uint8)
    pixels[height - height // 4 :, :] = 5
    return pixels


def write_shards(root: Path, counts=(7, 6, 5), size: int = 24, broken: tuple = ()) -> tuple[list[Path], list]:
    """``root/train-00000k.tar`` WebDataset shards of PNG samples (with a ``.cls``); ``broken`` lists
    (shard, sample) pairs whose image bytes are garbage. Returns the shard paths and the images."""
    root.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    for k, count in enumerate(counts):
        path = root / f"train-{k:06d}.tar"
        pixels = tiles(count, size, seed=10 + k)
        with tarfile.open(path, "w") as tar:
            for i in range(count):
                key = f"sample{k:02d}_{i:04d}"
                if (k, i) in broken:
                    data = b"not a png"
                else:
                    buffer = io.BytesIO()
                    from PIL import Image

                    Image.fromarray(pixels[i]).save(buffer, format="PNG")
                    data = buffer.getvalue()
                for name, payload in ((f"{key}.png", data), (f"{key}.cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
        images.append(pixels)
    return paths, images
