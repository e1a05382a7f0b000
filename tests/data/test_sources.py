"""The file-backed sources on small files the tests make: HDF5 tile stores, pyramidal TIFFs read
through OpenSlide, WebDataset tar shards; their indexes, failures, and the ``data`` CLI."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dino_bridge.cli import main as cli_main
from dino_bridge.config import ConfigError, load_config
from dino_bridge.data import ImageFolderDataset, SSLTrainDataset
from dino_bridge.data.images import ImageLoadError
from dino_bridge.data.sources import H5TileSource, MissingExtraError, ShardSource, WSITileSource
from dino_bridge.data.sources import common as common_module
from dino_bridge.data.sources.wsi import build_wsi_index
from dino_bridge.data.stats import channel_stats
from tests.helpers import CONFIGS
from tests.source_files import (
    corrupt_h5_tiles,
    make_h5_store,
    slide_pixels,
    tiles,
    write_h5,
    write_pyramid_tiff,
    write_shards,
)


def _pixels(source, index: int) -> np.ndarray:
    return np.asarray(source.load(index))


# ------------------------------------------------------------------------------------- HDF5
def test_h5_tiles_equal_the_stored_ones_and_the_index_is_memory_mapped(tmp_path):
    listing, stored = make_h5_store(tmp_path / "store")
    source = H5TileSource(listing)
    everything = np.concatenate(stored)
    assert len(source) == len(everything) == 18
    for i in range(len(source)):
        np.testing.assert_array_equal(_pixels(source, i), everything[i])
    assert source.load(0).mode == "RGB"
    assert isinstance(source.index.rows, np.memmap)
    assert source.index.path == f"{listing}.patches.h5index"
    assert source.describe(11) == f"{tmp_path / 'store' / 'part1.h5'}[1]"
    # the garbage file is left out of the index, with its reason
    assert list(source.unreadable) == [str(tmp_path / "store" / "broken.h5")]
    assert "file signature not found" in source.unreadable[str(tmp_path / "store" / "broken.h5")]
    assert len(source._files) <= 8


def test_h5_index_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    listing, _ = make_h5_store(tmp_path / "store", garbage=False)
    H5TileSource(listing)
    counted = []
    original = common_module.build_index
    monkeypatch.setattr(
        common_module, "build_index", lambda *a, **k: counted.append(a[0]) or original(*a, **k)
    )
    H5TileSource(listing)
    assert counted == []  # up to date: opened, not recounted
    write_h5(tmp_path / "store" / "part1.h5", tiles(3, seed=5))  # size and mtime change
    source = H5TileSource(listing)
    assert counted == ["h5:patches"] and len(source) == 10 + 3
    np.testing.assert_array_equal(_pixels(source, 12), tiles(3, seed=5)[2])
    # a rank that only opens the index refuses a stale one
    write_h5(tmp_path / "store" / "part0.h5", tiles(4, seed=6))
    with pytest.raises(ValueError, match="no up-to-date index"):
        H5TileSource(listing, build_index=False)


def test_h5_index_goes_to_the_output_dir_when_the_list_folder_is_read_only(tmp_path, monkeypatch):
    listing, _ = make_h5_store(tmp_path / "store", garbage=False)
    store = str(tmp_path / "store")
    original = common_module.writable_dir
    monkeypatch.setattr(common_module, "writable_dir", lambda folder: folder != store and original(folder))
    source = H5TileSource(listing, index_dir=tmp_path / "run")
    assert source.index.path.startswith(str(tmp_path / "run" / "data_index"))
    assert not os.path.exists(f"{listing}.patches.h5index")
    assert (
        H5TileSource(listing, index_dir=tmp_path / "run", build_index=False).index.path == source.index.path
    )
    with pytest.raises(ValueError, match="is writable"):
        H5TileSource(listing)  # no output dir to fall back to


def test_h5_file_failing_at_read_time_is_one_report_and_its_tiles_are_replaced(tmp_path):
    listing, stored = make_h5_store(tmp_path / "store", garbage=False)
    source = H5TileSource(listing)
    bad = tmp_path / "store" / "part1.h5"
    bad.write_bytes(b"\0" * bad.stat().st_size)  # goes bad after it was indexed
    with pytest.raises(ImageLoadError, match="part1.h5.*cannot open"):
        source.load(10)
    assert source.describe(12) == str(bad)  # every tile of it names the file: one report
    with pytest.raises(ImageLoadError):
        source.load(12)
    dataset = SSLTrainDataset(
        source, lambda image, gen: {"global_crops": [], "local_crops": []}, seed=0, rank=0
    )
    skipped = [name for i in range(10, 18) for name in dataset[(i, i)]["skipped"]]
    assert skipped and {name.split(" (")[0] for name in skipped} == {str(bad)}


def test_h5_corrupt_chunk_fails_that_tile_alone(tmp_path):
    pixels = tiles(5)
    write_h5(tmp_path / "a.h5", pixels, chunked=True)
    corrupt_h5_tiles(tmp_path / "a.h5", [2])
    (tmp_path / "list.txt").write_text("a.h5\n")
    source = H5TileSource(tmp_path / "list.txt")
    with pytest.raises(ImageLoadError, match=r"a.h5\[2\]"):
        source.load(2)
    assert source.describe(2).endswith("a.h5[2]")
    np.testing.assert_array_equal(_pixels(source, 3), pixels[3])


def test_h5_wrong_layout_and_missing_key_are_named(tmp_path):
    import h5py

    with h5py.File(tmp_path / "gray.h5", "w") as handle:
        handle.create_dataset("patches", data=np.zeros((2, 8, 8), dtype=np.uint8))
    write_h5(tmp_path / "other.h5", tiles(2), key="images")
    (tmp_path / "list.txt").write_text("gray.h5\nother.h5\n")
    with pytest.raises(
        ValueError, match=r"hold no tiles.*expected uint8 \[N, H, W, 3\].*no dataset 'patches'"
    ):
        H5TileSource(tmp_path / "list.txt")
    assert len(H5TileSource(tmp_path / "list.txt", h5_key="images")) == 2


@pytest.mark.parametrize(
    ("module", "extra", "build"),
    [
        ("h5py", "h5", lambda p: H5TileSource(p)),
        ("openslide", "wsi", lambda p: WSITileSource(p)),
        ("wids", "shards", lambda p: ShardSource(p)),
    ],
)
def test_a_missing_optional_package_names_the_extra(tmp_path, monkeypatch, module, extra, build):
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(MissingExtraError, match=rf"pip install 'dino_bridge\[{extra}\]'"):
        build(tmp_path / "anything")


# --------------------------------------------------------------------------------- OpenSlide
def test_wsi_tiles_read_through_openslide_equal_the_written_pixels(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    pyramid = write_pyramid_tiff(tmp_path / "slide.tiff", pixels, levels=2, tile=32)
    dtype = [("slide", "U16"), ("x", "<i8"), ("y", "<i8"), ("level", "<i4"), ("size", "<i4")]
    rows = np.array(
        [("slide.tiff", 0, 0, 0, 32), ("slide.tiff", 40, 20, 0, 24), ("slide.tiff", 32, 16, 1, 16)], dtype
    )
    np.save(tmp_path / "index.npy", rows)  # relative slide paths: resolved against the index's folder
    source = WSITileSource(tmp_path / "index.npy")
    assert len(source) == 3 and isinstance(source.rows, np.memmap)
    np.testing.assert_array_equal(_pixels(source, 0), pixels[0:32, 0:32])
    np.testing.assert_array_equal(_pixels(source, 1), pixels[20:44, 40:64])
    np.testing.assert_array_equal(
        _pixels(source, 2), pyramid[1][8:24, 16:32]
    )  # level 1: (x, y) in level-0 px
    assert source.describe(1) == f"{tmp_path / 'slide.tiff'}@x=40,y=20,level=0,size=24"


def test_wsi_slide_that_fails_to_open_is_named_for_all_its_tiles(tmp_path):
    (tmp_path / "broken.svs").write_bytes(b"not a slide" * 10)
    dtype = [("slide", "U16"), ("x", "<i8"), ("y", "<i8"), ("level", "<i4"), ("size", "<i4")]
    np.save(tmp_path / "index.npy", np.array([("broken.svs", 0, 0, 0, 8), ("broken.svs", 8, 0, 0, 8)], dtype))
    source = WSITileSource(tmp_path / "index.npy")
    with pytest.raises(ImageLoadError, match="broken.svs.*cannot open"):
        source.load(0)
    assert source.describe(0) == source.describe(1) == str(tmp_path / "broken.svs")
    np.save(tmp_path / "bad.npy", np.zeros(3))
    with pytest.raises(ValueError, match="structured array with fields slide, x, y, level, size"):
        WSITileSource(tmp_path / "bad.npy")


def test_index_wsi_drops_blank_tiles_and_prints_the_kept_counts(tmp_path, capsys):
    pixels = slide_pixels(128, 160)  # tissue on the left half, white glass right, black bar at the bottom
    write_pyramid_tiff(tmp_path / "a.tiff", pixels, levels=2, tile=32)
    write_pyramid_tiff(tmp_path / "blank.tiff", np.full((64, 64, 3), 250, np.uint8), levels=1, tile=32)
    out = tmp_path / "index.npy"
    code = cli_main(["data", "index-wsi", str(tmp_path / "a.tiff"), str(tmp_path / "blank.tiff"),
                     "--out", str(out), "--tile", "32", "--level", "0"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    # 5×4 tiles of 32: columns 0-1 tissue, column 2 half tissue (kept at 0.5), rows 0-2 (row 3 black)
    assert f"{tmp_path / 'a.tiff'}: kept 9 of 20 tiles" in printed
    assert f"{tmp_path / 'blank.tiff'}: kept 0 of 4 tiles" in printed
    source = WSITileSource(out)
    assert sorted((int(r["x"]), int(r["y"])) for r in source.rows) == [
        (x, y) for x in (0, 32, 64) for y in (0, 32, 64)
    ]
    np.testing.assert_array_equal(_pixels(source, 0), pixels[0:32, 0:32])
    # a stricter threshold drops the half-tissue column too; level 1 tiles have level-0 coordinates
    rows, report = build_wsi_index([tmp_path / "a.tiff"], tile=32, level=0, background_threshold=0.3)
    assert report[0].kept == 6
    rows, report = build_wsi_index([tmp_path / "a.tiff"], tile=16, level=1)
    assert report[0].total == 20 and set(rows["x"]) <= {0, 32, 64, 96, 128}
    assert cli_main(["data", "index-wsi", str(tmp_path / "blank.tiff"), "--out", str(tmp_path / "x.npy"),
                     "--tile", "32"]) == 2  # fmt: skip
    assert "no tile was kept" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ shards
def test_shards_from_a_pattern_a_list_and_a_folder_are_the_same_samples(tmp_path):
    paths, images = write_shards(tmp_path / "shards", counts=(7, 6, 5))
    (tmp_path / "shards.txt").write_text("\n".join(f"shards/{p.name}" for p in paths) + "\n")
    everything = np.concatenate(images)
    specs = [str(tmp_path / "shards" / "train-{000000..000002}.tar"), str(tmp_path / "shards.txt"),
             str(tmp_path / "shards")]  # fmt: skip
    for spec in specs:
        source = ShardSource(spec)
        assert len(source) == 18, spec
        for i in (0, 6, 7, 17):
            np.testing.assert_array_equal(_pixels(source, i), everything[i])
    assert source.describe(7) == f"{paths[1]}[0]"
    assert isinstance(source.index.rows, np.memmap)


def test_shard_samples_are_counted_once(tmp_path, monkeypatch):
    from dino_bridge.data.sources import shards as shards_module

    paths, _ = write_shards(tmp_path / "s", counts=(4, 3))
    ShardSource(tmp_path / "s")
    monkeypatch.setattr(shards_module, "count_samples", lambda path: pytest.fail(f"recounted {path}"))
    assert len(ShardSource(tmp_path / "s")) == 7


def test_shard_corrupt_sample_and_broken_shard(tmp_path):
    paths, images = write_shards(tmp_path / "s", counts=(4, 3), broken=((0, 1),))
    (tmp_path / "s" / "zz-empty.tar").write_bytes(b"")
    source = ShardSource(tmp_path / "s")
    assert len(source) == 7 and list(source.unreadable) == [str(tmp_path / "s" / "zz-empty.tar")]
    with pytest.raises(ImageLoadError, match=r"train-000000.tar\[1\].png.*not a recognised image"):
        source.load(1)
    np.testing.assert_array_equal(_pixels(source, 2), images[0][2])
    paths[1].write_bytes(b"\1" * 1024)  # goes bad after it was indexed
    with pytest.raises(ImageLoadError, match="train-000001.tar"):
        source.load(4)
    assert source.describe(5) == str(paths[1])


# ------------------------------------------------------------------------------ config + stats
def test_config_selects_exactly_one_source_kind(tmp_path):
    base = ["data.fashion_mnist.demo=null"]
    cfg = load_config(CONFIGS / "smoke_cpu.yaml", base + ["data.fashion_mnist.shards=/x/a-{0..3}.tar"])
    assert cfg.data.fashion_mnist.shards == "/x/a-{0..3}.tar" and cfg.data.fashion_mnist.h5_key == "patches"
    with pytest.raises(
        ConfigError,
        match=r"'data.fashion_mnist' sets h5_list='a', shards='b'; "
        r"allowed: exactly one of .*h5_list, wsi_index, shards",
    ):
        load_config(
            CONFIGS / "smoke_cpu.yaml", base + ["data.fashion_mnist.h5_list=a", "data.fashion_mnist.shards=b"]
        )


def _known_stats_images(folder):
    """Red ∈ {51, 153} (mean 0.4, std 0.2), green ∈ {0, 255} (0.5, 0.5), blue ∈ {0, 204} (0.4, 0.4)."""
    folder.mkdir()
    for k in range(6):
        pixels = np.zeros((10, 12, 3), dtype=np.uint8)
        pixels[..., 0] = np.where(np.arange(12) % 2 == 0, 51, 153)
        pixels[..., 1] = np.where(np.arange(10)[:, None] % 2 == k % 2, 0, 255)
        pixels[..., 2] = np.where((np.arange(10)[:, None] + np.arange(12)) % 2 == 0, 0, 204)
        Image.fromarray(pixels).save(folder / f"im{k}.png")
    (folder / "broken.png").write_bytes(b"nope")
    return folder


def test_data_stats_recovers_a_known_mean_and_std(tmp_path, capsys):
    folder = _known_stats_images(tmp_path / "images")
    assert cli_main(["data", "stats", str(folder), "--samples", "100"]) == 0
    captured = capsys.readouterr()
    assert (
        captured.out.strip() == "crops.rgb_mean=[0.4000,0.5000,0.4000] crops.rgb_std=[0.2000,0.5000,0.4000]"
    )
    assert "6 images, 720 pixels (seed 0); 1 unreadable skipped" in captured.err
    # the printed line is a valid pair of overrides
    cfg = load_config(CONFIGS / "smoke_cpu.yaml", captured.out.split())
    assert list(cfg.crops.rgb_std) == [0.2, 0.5, 0.4]
    # the sample is seeded and of the requested size
    first = channel_stats(ImageFolderDataset(folder), 3, seed=1)
    assert (
        first == channel_stats(ImageFolderDataset(folder), 3, seed=1)
        and first.images + len(first.skipped) == 3
    )


def test_data_stats_reads_every_source_kind(tmp_path, capsys):
    listing, stored = make_h5_store(tmp_path / "store", garbage=False)
    everything = np.concatenate(stored).reshape(-1, 3) / 255.0
    assert cli_main(["data", "stats", str(listing), "--samples", "1000"]) == 0
    expected = ",".join(f"{v:.4f}" for v in everything.mean(0))
    assert capsys.readouterr().out.startswith(f"crops.rgb_mean=[{expected}]")
    write_shards(tmp_path / "s", counts=(3,))
    assert cli_main(["data", "stats", f"shards={tmp_path / 's'}", "--samples", "2"]) == 0
    assert capsys.readouterr().out.startswith("crops.rgb_mean=[")
    assert cli_main(["data", "stats", "nosuchkey=3"]) == 2
    assert "unknown source key 'nosuchkey'" in capsys.readouterr().err


def test_sources_feed_the_training_dataset(tmp_path):
    """Each source goes through SSLTrainDataset's crops like an image folder."""
    from dino_bridge.data import MultiCropAugmentation

    listing, _ = make_h5_store(tmp_path / "store", garbage=False)
    transform = MultiCropAugmentation(global_crops_size=16, local_crops_size=8, local_crops_number=2)
    sample = SSLTrainDataset(H5TileSource(listing), transform, seed=0, rank=0)[(3, 0)]
    assert [tuple(c.shape) for c in sample["global_crops"]] == [(3, 16, 16)] * 2
    assert all(torch.isfinite(c).all() for c in sample["local_crops"])


def test_sources_pickle_without_their_open_files(tmp_path):
    """Spawned DataLoader workers (macOS, Windows) receive the source pickled: no handle travels."""
    import pickle

    listing, stored = make_h5_store(tmp_path / "store", garbage=False)
    paths, images = write_shards(tmp_path / "s", counts=(3,))
    write_pyramid_tiff(tmp_path / "slide.tiff", slide_pixels(64, 64), levels=1, tile=32)
    rows, _ = build_wsi_index([tmp_path / "slide.tiff"], tile=32, background_threshold=1.0)
    np.save(tmp_path / "index.npy", rows)
    for source in (H5TileSource(listing), ShardSource(tmp_path / "s"), WSITileSource(tmp_path / "index.npy")):
        expected = _pixels(source, 1)  # opens a file in this process
        copy = pickle.loads(pickle.dumps(source))
        assert len(copy) == len(source)
        np.testing.assert_array_equal(_pixels(copy, 1), expected)


def test_data_stats_warns_about_a_constant_channel(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(8) * 30
    pixels[..., 1] = 7
    Image.fromarray(pixels).save(folder / "a.png")
    assert cli_main(["data", "stats", str(folder), "--samples", "1"]) == 0
    captured = capsys.readouterr()
    assert "warning: channel G/B is constant in this sample (std 0)" in captured.err
    assert captured.out.strip().endswith("crops.rgb_std=[0.2696,0.0000,0.0000]")
