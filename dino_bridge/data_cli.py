"""``dino-bridge data``: tools for the training data.

    dino-bridge data index-wsi SLIDES… --out index.npy --tile 224 --level 0 [--background-threshold 0.5]
    dino-bridge data stats SOURCE --samples 1000 [--seed 0] [--h5-key patches]

SOURCE is ``KEY=VALUE`` with a ``data.<name>`` key (``txt_path=list.txt``, ``root=folder``,
``demo=fashion-mnist``, ``h5_list=files.txt``, ``wsi_index=index.npy``, ``shards='a-{0..9}.tar'``),
or a bare path, read as: a ``.npy`` → wsi_index; a ``.tar`` or a brace pattern → shards; a folder →
root; a ``.txt`` whose first entry is an HDF5 file → h5_list, a ``.tar`` → shards, else txt_path; a
demo dataset's name → demo.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config.schema import DataSourceConfig
from .data.datasets import DEMO_DATASETS
from .data.sources.common import read_path_list

H5_EXTENSIONS = (".h5", ".hdf5", ".he5", ".hdf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tools = parser.add_subparsers(dest="data_command", required=True)
    wsi = tools.add_parser("index-wsi", help="index the non-background tiles of whole-slide images")
    wsi.add_argument("slides", nargs="+", help="slide files OpenSlide can read (.svs, .tiff, .ndpi, ...)")
    wsi.add_argument("--out", required=True, help="the index to write (.npy), for data.<name>.wsi_index")
    wsi.add_argument("--tile", type=int, default=224, help="tile side in pixels of --level (default 224)")
    wsi.add_argument("--level", type=int, default=0, help="pyramid level the tiles are read at (default 0)")
    wsi.add_argument(
        "--background-threshold",
        type=float,
        default=0.5,
        help="drop a tile when more than this fraction of its pixels is near-white or near-black (0.5)",
    )
    stats = tools.add_parser("stats", help="per-channel mean/std of a source, as crops.rgb_mean/rgb_std")
    stats.add_argument("source", help="KEY=VALUE (a data.<name> key) or a path (see dino-bridge data --help)")
    stats.add_argument("--samples", type=int, default=1000, help="images in the seeded sample (default 1000)")
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--h5-key", default="patches", help="the tiles' dataset in h5_list files")
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def source_config(spec: str, h5_key: str = "patches") -> DataSourceConfig:
    """The ``DataSourceConfig`` of a SOURCE argument (see the module docstring)."""
    keys = ("txt_path", "root", "demo", "h5_list", "wsi_index", "shards")
    key, sep, value = spec.partition("=")
    if sep and key in keys:
        return DataSourceConfig(**{key: value, "h5_key": h5_key})
    if sep and "/" not in key and not os.path.exists(spec):
        raise ValueError(f"unknown source key {key!r}; valid keys: {', '.join(keys)}")
    return DataSourceConfig(**{_guess_kind(spec): spec, "h5_key": h5_key})


def _guess_kind(path: str) -> str:
    if path.endswith(".npy"):
        return "wsi_index"
    if path.endswith(".tar") or "{" in path:
        return "shards"
    if os.path.isdir(path):
        return "root"
    if os.path.isfile(path):
        first = read_path_list(path, "image")[0].lower()
        return (
            "h5_list" if first.endswith(H5_EXTENSIONS) else "shards" if first.endswith(".tar") else "txt_path"
        )
    if path in DEMO_DATASETS:
        return "demo"
    raise ValueError(f"source {path!r} is not a file, a folder, a brace pattern nor a demo dataset")


def _index_wsi(args) -> int:
    from .data.sources.wsi import build_wsi_index, save_wsi_index

    rows, report = build_wsi_index(
        args.slides, tile=args.tile, level=args.level, background_threshold=args.background_threshold
    )
    for slide in report:
        print(f"{slide.slide}: kept {slide.kept} of {slide.total} tiles")
    if len(rows) == 0:
        raise ValueError("no tile was kept (all background?): nothing written")
    save_wsi_index(rows, args.out)
    print(
        f"wrote {args.out}: {len(rows)} tiles of {len(report)} slide(s), {args.tile} px at level {args.level}"
    )
    return 0


def _stats(args) -> int:
    from .data.stats import channel_stats
    from .train.sources import open_source

    source = open_source("stats", source_config(args.source, args.h5_key))
    result = channel_stats(source, args.samples, args.seed)
    note = f"; {len(result.skipped)} unreadable skipped" if result.skipped else ""
    print(f"{result.images} images, {result.pixels} pixels (seed {args.seed}){note}", file=sys.stderr)
    flat = [c for c, std in zip("RGB", result.std) if std < 5e-5]
    if flat:
        print(
            f"warning: channel {'/'.join(flat)} is constant in this sample (std 0); "
            "crops.rgb_std must be > 0, so replace that entry (e.g. by 1.0) before using the line below",
            file=sys.stderr,
        )
    print(result.overrides())
    return 0


def main(args: argparse.Namespace) -> int:
    if args.data_command == "index-wsi":
        return _index_wsi(args)
    return _stats(args)
