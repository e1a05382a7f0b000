"""crops.view_pipeline and crops.jpeg_draft_min_side reach the data pipeline the trainer builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_bridge.data import ImageFolderDataset, ImageListDataset, load_image
from dino_bridge.data.images import decode_image, draft_size
from dino_bridge.train import build
from tests.helpers import make_image_folder, tiny_config


def _jpeg(path, size=(800, 600)) -> str:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return str(path)


def test_view_pipeline_key_selects_the_pipeline_and_keeps_the_draws(tmp_path):
    folder = make_image_folder(tmp_path / "images", n=6, size=40)
    batches = {}
    for pipeline in ("reference", "fast"):
        cfg = tiny_config(folder, extra=[f"crops.view_pipeline={pipeline}"])
        assert build.build_augmentation(cfg).view_pipeline == pipeline
        assert build.build_invariance_views(cfg).pixels.name == pipeline
        loader = build.build_loader(
            cfg,
            build.build_train_source(cfg),
            rank=0,
            world_size=1,
            start_position=0,
            pin_memory=False,
            invariance_kinds=frozenset({"raw", "resizepaste"}),
        )
        batches[pipeline] = next(iter(loader))
    ref, fast = batches["reference"], batches["fast"]
    assert torch.equal(ref["positions"], fast["positions"])
    for kind in ref["masks"]:  # masks and rolls do not depend on the pixels
        assert torch.equal(ref["masks"][kind].masks, fast["masks"][kind].masks), kind
    for source in ref["rolls"]:
        assert torch.equal(ref["rolls"][source], fast["rolls"][source])
    assert ref["views"].keys() == fast["views"].keys()
    for kind, views in ref["views"].items():
        assert views.shape == fast["views"][kind].shape and views.dtype == fast["views"][kind].dtype
        assert (views - fast["views"][kind]).abs().mean() < 0.05, kind  # the same crops, rounding apart


def test_default_is_reference(tmp_path):
    cfg = tiny_config(make_image_folder(tmp_path / "images", n=2, size=40))
    assert cfg.crops.view_pipeline == "reference" and cfg.crops.jpeg_draft_min_side == 0
    assert build.build_augmentation(cfg).view_pipeline == "reference"


def test_draft_decodes_jpegs_at_the_smallest_scale_that_keeps_the_short_side(tmp_path):
    path = _jpeg(tmp_path / "big.jpg")  # 800×600
    assert load_image(path).size == (800, 600)
    assert load_image(path, draft_min_side=300).size == (400, 300)  # 1/2
    assert load_image(path, draft_min_side=299).size == (400, 300)  # 1/4 would be 150 < 299
    assert load_image(path, draft_min_side=75).size == (100, 75)  # 1/8
    assert load_image(path, draft_min_side=1000).size == (800, 600)  # never upscaled
    assert draft_size((800, 600), 300) == (400, 300)
    with open(path, "rb") as handle:
        assert decode_image(handle.read(), "big.jpg", draft_min_side=150).size == (200, 150)
    png = tmp_path / "big.png"
    Image.open(path).save(png)
    assert load_image(png, draft_min_side=75).size == (800, 600)  # only JPEGs have DCT scales


def test_draft_key_reaches_the_image_sources(tmp_path):
    folder = tmp_path / "jpegs"
    folder.mkdir()
    paths = [_jpeg(folder / f"img_{k}.jpg") for k in range(2)]
    (tmp_path / "list.txt").write_text("\n".join(paths) + "\n")
    assert ImageListDataset(tmp_path / "list.txt", draft_min_side=150).load(0).size == (200, 150)
    assert ImageFolderDataset(folder, draft_min_side=300).load(1).size == (400, 300)
    with pytest.raises(ValueError, match="draft_min_side"):
        ImageListDataset(tmp_path / "list.txt", draft_min_side=-1)
    cfg = tiny_config(folder, extra=["crops.jpeg_draft_min_side=150"])
    assert build.build_train_source(cfg).load(0).size == (200, 150)
    cfg = tiny_config(folder)
    assert build.build_train_source(cfg).load(0).size == (800, 600)
