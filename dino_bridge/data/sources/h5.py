"""Tiles stored in HDF5 files (``data.<name>.h5_list``): a txt list of files, each holding uint8
tiles [N, H, W, 3] under one dataset key (``h5_key``, default ``patches``).

The (file, tile) index is counted once and kept next to the list (``<list>.<key>.h5index``), or in
the run's output dir when the list's folder is read-only (``common.ItemIndex``). Each process keeps a
few files open (an LRU). Two kinds of failure, both reported and never fatal:
- a file that cannot be counted when the index is built (not HDF5, no such key, wrong shape or
  dtype) has no tiles in the index; ``unreadable`` names it with the reason (the trainer logs it);
- a file that fails to open while training (it went bad after it was indexed) fails every tile with
  an ``ImageLoadError`` whose description is the file itself, so it is reported once and its tiles
  are replaced like unreadable images. A tile whose data cannot be read (a corrupt chunk) fails alone.

Needs ``h5py`` (``pip install 'dino_bridge[h5]'``).
"""

from __future__ import annotations

import os

from PIL import Image

from dino_bridge.data.images import ImageLoadError
from dino_bridge.data.sources.common import (
    IndexedFiles,
    OpenFiles,
    ensure_index,
    index_locations,
    read_path_list,
    require,
)

DEFAULT_H5_KEY = "patches"


def _h5py():
    return require("h5py", "h5", "data source h5_list")


def count_tiles(path: str, key: str = DEFAULT_H5_KEY) -> int:
    """The number of tiles of ``path`` (raises ``ValueError`` when the layout is not uint8 [N, H, W, 3])."""
    with _h5py().File(path, "r") as handle:
        if key not in handle:
            raise ValueError(f"no dataset {key!r} (it has: {', '.join(sorted(handle.keys())) or 'nothing'})")
        dataset = handle[key]
        shape, dtype = tuple(getattr(dataset, "shape", ())), getattr(dataset, "dtype", None)
        if len(shape) != 4 or shape[-1] != 3 or dtype != "uint8":
            raise ValueError(f"dataset {key!r} is {dtype} {list(shape)}; expected uint8 [N, H, W, 3]")
        return int(shape[0])


def _open_file(path: str):
    """A module-level opener: the source stays picklable (spawned DataLoader workers)."""
    return _h5py().File(path, "r")


class H5TileSource(IndexedFiles):
    """An ``ImageSource`` over the tiles of the HDF5 files listed in ``list_path``.

    ``index_dir`` is the fallback folder of the index (the run's output dir); ``build_index=False``
    only opens an up-to-date index (the ranks that wait for the first one to build it).
    """

    labels: list[int] | None = None
    classes: list[str] | None = None

    def __init__(
        self,
        list_path: str | os.PathLike,
        *,
        h5_key: str = DEFAULT_H5_KEY,
        index_dir: str | os.PathLike | None = None,
        build_index: bool = True,
        max_open_files: int = 8,
    ) -> None:
        _h5py()  # a clear error now if the extra is missing
        if not h5_key:
            raise ValueError("h5_key must be a dataset name, got an empty string")
        self.list_path = os.fspath(list_path)
        self.h5_key = str(h5_key)
        self.paths = read_path_list(self.list_path, "HDF5 file")
        locations = index_locations(
            self.list_path, f".{self.h5_key}.h5index", None if index_dir is None else os.fspath(index_dir)
        )
        self.index = ensure_index(
            f"h5:{self.h5_key}",
            self.paths,
            lambda path: count_tiles(path, self.h5_key),
            locations,
            build=build_index,
        )
        self.require_items(f"the HDF5 files of {self.list_path!r}", "tiles")
        self._files = OpenFiles(_open_file, capacity=max_open_files)

    def load(self, index: int) -> Image.Image:
        path, tile = self.index.locate(index)
        handle = self._files.get(path)
        try:
            pixels = handle[self.h5_key][tile]
        except Exception as error:  # h5py raises OSError/KeyError/... for a corrupt chunk or header
            raise ImageLoadError(f"{path}[{tile}]", f"{type(error).__name__}: {error}") from error
        return Image.fromarray(pixels)

    def describe(self, index: int) -> str:
        path, tile = self.index.locate(index)
        return path if path in self._files.failed else f"{path}[{tile}]"
