"""SSLTrainDataset (bad-file replacement), MultiCropCollate and the DataLoader, end to end on tiny images."""

import numpy as np
import pytest
import torch
from PIL import Image

from dino_bridge.data import (
    ImageListDataset,
    MultiCropAugmentation,
    MultiCropCollate,
    ShardedInfiniteSampler,
    SSLTrainDataset,
    build_train_loader,
)

G, L, PATCH = 16, 8, 4


def _image_list(tmp_path, count=6, bad=()):
    """A txt list of small random images; entries in ``bad`` are broken files of various kinds."""
    lines = []
    for i in range(count):
        path = tmp_path / f"img{i}.png"
        if i in bad:
            kind = i % 3
            if kind == 0:
                path = tmp_path / f"missing{i}.png"  # listed but absent
            elif kind == 1:
                path.write_bytes(b"")
            else:
                path.write_text("not an image")
        else:
            pixels = np.random.RandomState(i).randint(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        lines.append(path.name)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return ImageListDataset(tmp_path / "list.txt")


def _augmentation(local_crops_number=2):
    return MultiCropAugmentation(
        global_crops_size=G, local_crops_size=L, local_crops_number=local_crops_number
    )


def _dataset(source, **options):
    return SSLTrainDataset(source, _augmentation(), seed=11, rank=0, **options)


def test_bad_file_never_raises_and_is_reported(tmp_path):
    source = _image_list(tmp_path, bad=(0, 1, 2))
    dataset = _dataset(source)
    for position in range(12):
        sample = dataset[(position % 6, position)]
        assert len(sample["global_crops"]) == 2 and sample["position"] == position
        if position % 6 in (0, 1, 2):
            # the report names the file and says why it could not be read
            assert sample["skipped"][0].startswith(source.describe(position % 6) + " (")
        else:
            assert sample["skipped"] == []


def test_replacement_is_deterministic(tmp_path):
    source = _image_list(tmp_path, bad=(1,))
    first, second = _dataset(source)[(1, 4)], _dataset(source)[(1, 4)]
    assert first["skipped"] == second["skipped"]
    assert len(first["skipped"]) == 1 and first["skipped"][0].startswith(source.describe(1) + " (")
    for a, b in zip(
        first["global_crops"] + first["local_crops"], second["global_crops"] + second["local_crops"]
    ):
        assert torch.equal(a, b)
    # A process that already knows the file is bad (index seen before) produces the same sample.
    warm = _dataset(source)
    warm[(1, 0)]
    again = warm[(1, 4)]
    assert again["skipped"] == first["skipped"] and torch.equal(
        again["global_crops"][0], first["global_crops"][0]
    )


def test_all_bad_raises_clear_error(tmp_path):
    source = _image_list(tmp_path, count=3, bad=(0, 1, 2))
    with pytest.raises(RuntimeError, match="every attempt") as caught:
        _dataset(source, max_retries=5)[(0, 0)]
    assert source.describe(0) in str(caught.value)


def _fake_sample(position, local_crops_number=3):
    return {
        "global_crops": [torch.full((3, G, G), float(10 * position + k)) for k in range(2)],
        "local_crops": [torch.full((3, L, L), float(10 * position + k)) for k in range(local_crops_number)],
        "position": position,
        "skipped": [f"bad{position}"] if position == 1 else [],
    }


def _collate(**overrides):
    options = dict(patch_size=PATCH, mask_probability=0.5, mask_ratio_min_max=(0.1, 0.5), seed=0, rank=0)
    options.update(overrides)
    return MultiCropCollate(**options)


def test_collate_layout_masks_and_weights():
    batch = _collate()([_fake_sample(p) for p in (4, 5, 6, 7)])
    num_patches = (G // PATCH) ** 2
    views = batch["views"]
    assert views["global"].shape == (8, 3, G, G) and views["local"].shape == (12, 3, L, L)
    # crop-major: every image's crop 1, then every image's crop 2
    assert [t[0, 0, 0].item() for t in views["global"]] == [40, 50, 60, 70, 41, 51, 61, 71]
    assert [t[0, 0, 0].item() for t in views["local"][:5]] == [40, 50, 60, 70, 41]
    ibot = batch["masks"]["global"]
    masks = ibot.masks
    assert masks.shape == (8, num_patches) and masks.dtype == torch.bool
    assert int((masks.sum(1) > 0).sum()) == 4  # ⌊8 · 0.5⌋ masked global crops
    assert torch.equal(ibot.indices, masks.flatten().nonzero().flatten())
    assert ibot.count == int(masks.sum()) == len(ibot.weights)
    torch.testing.assert_close(ibot.weights.sum(), torch.tensor(4.0))
    owner = ibot.indices // num_patches
    torch.testing.assert_close(ibot.weights, 1.0 / masks.sum(1)[owner].float())
    assert set(batch) == {"views", "masks", "positions", "skipped", "batch_size"}  # no invariance views
    assert batch["positions"].tolist() == [4, 5, 6, 7] and batch["batch_size"] == 4
    assert batch["skipped"] == []


def test_collate_determinism_dtype_and_no_locals():
    samples = [_fake_sample(p, local_crops_number=0) for p in (0, 1)]
    first, again = _collate()(samples), _collate()(samples)
    assert torch.equal(first["masks"]["global"].masks, again["masks"]["global"].masks)
    assert "local" not in first["views"]
    assert first["skipped"] == ["bad1"]
    other_rank = [_collate(rank=r)(samples)["masks"]["global"].masks for r in range(1, 6)]
    assert any(not torch.equal(first["masks"]["global"].masks, m) for m in other_rank)
    assert _collate(dtype=torch.bfloat16)(samples)["views"]["global"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="patch_size"):
        _collate(patch_size=5)(samples)


def _batches(dataset, num_workers, count=3, batch_size=2):
    sampler = ShardedInfiniteSampler(len(dataset), rank=0, world_size=1, seed=11)
    loader = build_train_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, sampler=sampler, collate=_collate(seed=11)
    )
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(count)]
    del iterator, loader
    return batches


def test_loader_batches_do_not_depend_on_num_workers(tmp_path):
    dataset = _dataset(_image_list(tmp_path, count=5, bad=(2,)))
    in_process, with_workers = _batches(dataset, 0), _batches(dataset, 2)
    for a, b in zip(in_process, with_workers):
        assert a.keys() == b.keys()
        for kind in ("global", "local"):
            assert torch.equal(a["views"][kind], b["views"][kind]), kind
        for x, y in zip(a["masks"]["global"], b["masks"]["global"]):
            assert torch.equal(x, y)
        assert torch.equal(a["positions"], b["positions"]) and a["skipped"] == b["skipped"]
    assert [b["positions"].tolist() for b in in_process] == [[0, 1], [2, 3], [4, 5]]
    assert any(batch["skipped"] for batch in in_process)  # the broken file came up and was replaced
