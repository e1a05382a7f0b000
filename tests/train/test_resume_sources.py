"""Exact resume and the unreadable-item rules, for every file-backed source: a run stopped halfway
and started again equals the uninterrupted run, step for step, while unreadable items are
replaced and reported once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import LOSS_KEYS, read_metrics, run_training, tiny_config
from tests.source_files import (
    corrupt_h5_tiles,
    make_h5_store,
    slide_pixels,
    tiles,
    write_h5,
    write_pyramid_tiff,
    write_shards,
)


def _h5(root: Path) -> tuple[list[str], set[str], list[str]]:
    """Two good files, a chunked one with 3 corrupt tiles, a garbage one (left out when indexed)."""
    listing, _ = make_h5_store(root, counts=(10, 8), size=24)
    write_h5(root / "chunked.h5", tiles(6, 24, seed=9), chunked=True)
    corrupt_h5_tiles(root / "chunked.h5", [0, 2, 4])
    listing.write_text(listing.read_text() + "chunked.h5\n")
    bad = {f"{root / 'chunked.h5'}[{t}]" for t in (0, 2, 4)}
    return [f"data.fashion_mnist.h5_list={listing}"], bad, [f"{root / 'broken.h5'} is left out"]


def _wsi(root: Path) -> tuple[list[str], set[str], list[str]]:
    """24 tiles of a pyramidal TIFF, and 4 rows of a slide that cannot be opened."""
    root.mkdir(parents=True)
    write_pyramid_tiff(root / "slide.tiff", slide_pixels(96, 96, seed=1), levels=2, tile=32)
    (root / "broken.svs").write_bytes(b"not a slide" * 50)
    rows = [("slide.tiff", x, y, 0, 24) for x in range(0, 72, 12) for y in range(0, 48, 12)]
    rows += [("broken.svs", 24 * k, 0, 0, 24) for k in range(4)]
    dtype = [("slide", "U16"), ("x", "<i8"), ("y", "<i8"), ("level", "<i4"), ("size", "<i4")]
    np.save(root / "index.npy", np.array(rows, dtype))
    return [f"data.fashion_mnist.wsi_index={root / 'index.npy'}"], {str(root / "broken.svs")}, []


def _shards(root: Path) -> tuple[list[str], set[str], list[str]]:
    """Three shards (27 samples), four of them with undecodable images."""
    broken = ((0, 1), (0, 5), (1, 3), (2, 0))
    paths, _ = write_shards(root, counts=(9, 9, 9), broken=broken)
    pattern = str(root / "train-{000000..000002}.tar")
    return [f"data.fashion_mnist.shards={pattern}"], {f"{paths[k]}[{i}]" for k, i in broken}, []


SOURCES = {"h5_list": _h5, "wsi_index": _wsi, "shards": _shards}


def _losses(records: list[dict]) -> dict[int, list[float]]:
    return {r["iteration"]: [r[k] for k in LOSS_KEYS] for r in records}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_resume_is_exact_and_unreadable_items_are_replaced(kind, tmp_path):
    overrides, bad, logged = SOURCES[kind](tmp_path / "data")
    extra = ["data.fashion_mnist.root=null", *overrides]

    def config(**kwargs):
        return tiny_config(tmp_path / "unused", iterations=6, **kwargs)

    summary = run_training(config(period=3, extra=extra), tmp_path / "full")
    full = _losses(read_metrics(tmp_path / "full"))
    assert sorted(full) == list(range(6))
    # the unreadable items came up, were replaced, and are reported once each with a reason
    skipped = {name.split(" (")[0] for name in summary["skipped"]}
    assert skipped and skipped <= bad, summary["skipped"]
    log = (tmp_path / "full" / "train.log").read_text()
    for name in skipped:
        assert log.count(f"skipped an unreadable image: {name} (") == 1, name
    for line in logged:
        assert log.count(line) == 1, line

    part = run_training(config(period=100, extra=[*extra, "train.stop_at_iteration=3"]), tmp_path / "resumed")
    assert part["checkpoint"].endswith("ckpt/3")
    run_training(config(period=3, extra=extra), tmp_path / "resumed")
    resumed = _losses(read_metrics(tmp_path / "resumed"))
    assert sorted(resumed) == list(range(6))
    for it in range(6):
        assert resumed[it] == full[it], f"{kind}, iteration {it}: {resumed[it]} != {full[it]}"
