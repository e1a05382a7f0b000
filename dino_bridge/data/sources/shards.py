"""Tar shards in the WebDataset layout (``data.<name>.shards``), read with random access.

A sample is the run of consecutive tar members that share a key (``n01440764_10026.jpg``,
``n01440764_10026.cls``, ...); its image is the first member with an image extension
(``IMAGE_EXTENSIONS``). The shards are given as a brace pattern (``/data/train-{000000..000127}.tar``),
a txt list of shard paths (relative to the list's folder), a folder (every ``.tar`` under it, sorted)
or a single ``.tar``.

The samples per shard are counted once into a (shard, sample) index (``common.ItemIndex``) next to
the list, pattern or folder, or in the run's output dir when that folder is read-only; so the length
is known up front and the sampler keeps its exact resume and per-rank sharding. Reads go through
``wids`` (``IndexedTarSamples``: the tar's members located once per open shard, then memory-mapped
reads); each process keeps a few shards open. ``wids.ShardListDataset`` is not used: its download
cache copies local shards to /tmp and writes lock files next to them. A shard that fails to open fails
its samples with an ``ImageLoadError`` naming the shard (reported once, the samples replaced); a
sample without a decodable image fails alone.

Needs ``wids`` (``pip install 'dino_bridge[shards]'``).
"""

from __future__ import annotations

import os

from PIL import Image

from dino_bridge.data.images import IMAGE_EXTENSIONS, ImageLoadError, decode_image
from dino_bridge.data.sources.common import (
    IndexedFiles,
    OpenFiles,
    ensure_index,
    index_locations,
    read_path_list,
    require,
)

INDEX_SUFFIX = ".shardindex"


def _wids():
    return require("wids", "shards", "data source shards")


def _brace_expand(pattern: str) -> list[str]:
    braceexpand = require("braceexpand", "shards", "a brace pattern of shards")
    return list(braceexpand.braceexpand(pattern))


def resolve_shards(spec: str) -> tuple[list[str], str]:
    """(the shard paths, where the index lives beside) of a pattern, txt list, folder or tar."""
    if "{" in spec:
        paths = [os.path.abspath(p) for p in _brace_expand(spec)]
        return paths, os.path.abspath(spec)
    if os.path.isdir(spec):
        found = []
        for dirpath, dirnames, filenames in os.walk(spec, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [
                os.path.join(dirpath, f) for f in filenames if f.endswith(".tar") and not f.startswith(".")
            ]
        if not found:
            raise ValueError(f"shard folder {spec!r} holds no .tar files")
        return sorted(os.path.abspath(p) for p in found), os.path.join(os.path.abspath(spec), "shards")
    if os.path.isfile(spec) and spec.endswith(".tar"):
        return [os.path.abspath(spec)], os.path.abspath(spec)
    if os.path.isfile(spec):
        return read_path_list(spec, "shard"), os.path.abspath(spec)
    raise ValueError(
        f"shards {spec!r} is not a brace pattern ({{000000..000127}}), a txt list, a folder or a .tar file"
    )


def count_samples(path: str) -> int:
    samples = _wids().wids.IndexedTarSamples(path=path)
    try:
        return len(samples)
    finally:
        samples.close()


def _open_shard(path: str):
    """A module-level opener: the source stays picklable (spawned DataLoader workers)."""
    return _wids().wids.IndexedTarSamples(path=path)


def image_member(sample: dict) -> str | None:
    """The sample's first member with an image extension (``.jpg``, ``.png``, ...), if any."""
    for name in sample:
        if not name.startswith("__") and name.lower().endswith(IMAGE_EXTENSIONS):
            return name
    return None


class ShardSource(IndexedFiles):
    """An ``ImageSource`` over the samples of WebDataset tar shards (see the module docstring)."""

    labels: list[int] | None = None
    classes: list[str] | None = None

    def __init__(
        self,
        spec: str | os.PathLike,
        *,
        index_dir: str | os.PathLike | None = None,
        build_index: bool = True,
        max_open_shards: int = 8,
        draft_min_side: int = 0,
    ) -> None:
        _wids()  # a clear error now if the extra is missing
        self.spec = os.fspath(spec)
        self.paths, beside = resolve_shards(self.spec)
        locations = index_locations(beside, INDEX_SUFFIX, None if index_dir is None else os.fspath(index_dir))
        self.index = ensure_index("tar", self.paths, count_samples, locations, build=build_index)
        self.require_items(f"the shards {self.spec!r}", "samples")
        self._shards = OpenFiles(_open_shard, capacity=max_open_shards)
        if int(draft_min_side) < 0:
            raise ValueError(f"draft_min_side must be >= 0 (0: full-size decoding), got {draft_min_side}")
        self.draft_min_side = int(draft_min_side)  # > 0: JPEGs decoded at reduced size (load_image)

    def load(self, index: int) -> Image.Image:
        path, inner = self.index.locate(index)
        shard = self._shards.get(path)
        name = f"{path}[{inner}]"
        try:
            sample = shard[inner]
        except Exception as error:  # a damaged member header
            raise ImageLoadError(name, f"{type(error).__name__}: {error}") from error
        member = image_member(sample)
        if member is None:
            found = ", ".join(k for k in sample if not k.startswith("__"))
            raise ImageLoadError(
                name, f"no image member in sample {sample.get('__key__')!r} (it has {found})"
            )
        return decode_image(sample[member].getvalue(), f"{name}{member}", self.draft_min_side)

    def describe(self, index: int) -> str:
        path, inner = self.index.locate(index)
        return path if path in self._shards.failed else f"{path}[{inner}]"
