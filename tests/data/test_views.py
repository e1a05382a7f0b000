"""The invariance views: PatchRoll geometry and token correspondence, ResizePaste, the sources,
their keyed randomness, masks with exact counts, and resume with DataLoader workers."""

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
from dino_bridge.data.invariance import InvarianceSettings, InvarianceViews, data_kinds_for
from dino_bridge.data.views import (
    aligned_token_rows,
    inverse_roll_permutation,
    patchify,
    resize_paste,
    roll_images,
    roll_permutation,
    sample_resize_paste,
    sample_roll,
)
from dino_bridge.models import PatchEmbed
from dino_bridge.seeding import generator

SIZES = [(28, 7), (224, 16), (64, 16)]  # (global crop size, patch size)


def _rolls(n: int, max_shift: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.stack([sample_roll(max_shift, generator(seed, i)) for i in range(n)])


@pytest.mark.parametrize("size,patch", SIZES)
def test_rolled_image_and_permutation_give_the_same_patch_pixels(size, patch):
    images = torch.randn(4, 3, size, size, generator=generator(1))
    rolls = _rolls(4)
    rolled = roll_images(images, rolls, patch)
    for b in range(4):  # the batched roll is torch.roll by whole patches
        shifts = (patch * int(rolls[b, 0]), patch * int(rolls[b, 1]))
        assert torch.equal(rolled[b], torch.roll(images[b], shifts, dims=(-2, -1)))
    grid = size // patch
    perm = roll_permutation(grid, grid, rolls)
    raw_patches, rolled_patches = patchify(images, patch), patchify(rolled, patch)
    for b in range(4):
        # the content of source patch i lands at position perm[i]
        assert torch.equal(rolled_patches[b, perm[b]], raw_patches[b])
    inv = inverse_roll_permutation(grid, grid, rolls)
    assert torch.equal(torch.gather(perm, 1, inv), torch.arange(grid * grid).expand(4, -1))


@pytest.mark.parametrize("size,patch", SIZES)
def test_patch_embedding_of_the_rolled_image_is_the_permuted_embedding(size, patch):
    embed = PatchEmbed(size, patch, 3, 32)
    torch.manual_seed(0)
    embed.init_weights()
    images = torch.randn(3, 3, size, size, generator=generator(2))
    rolls = _rolls(3, seed=5)
    perm = roll_permutation(size // patch, size // patch, rolls)
    with torch.no_grad():
        raw, rolled = embed(images), embed(roll_images(images, rolls, patch))
    for b in range(3):
        torch.testing.assert_close(rolled[b, perm[b]], raw[b], rtol=0, atol=1e-6)


def test_teacher_token_for_student_position_j_is_the_raw_token_that_moved_there():
    size, patch, grid = 28, 7, 4
    images = torch.randn(2, 3, size, size, generator=generator(3))
    rolls = torch.tensor([[1, -2], [3, 0]])
    raw_tokens = patchify(images, patch)  # a token that is its patch's pixels: content-identifying
    student_tokens = patchify(roll_images(images, rolls, patch), patch)
    selected = torch.zeros(2, grid * grid, dtype=torch.bool)
    selected[0, [0, 5, 15]] = True
    selected[1, [2, 9]] = True
    student_rows, teacher_rows = aligned_token_rows(selected, rolls, grid, grid)
    assert student_rows.tolist() == [0, 5, 15, 16 + 2, 16 + 9]  # row-major (b, j)
    torch.testing.assert_close(
        raw_tokens.flatten(0, 1)[teacher_rows], student_tokens.flatten(0, 1)[student_rows]
    )
    # by hand: student position j = (1, 1) of image 0 (rolled by dr=1, dc=-2) shows source (0, 3)
    assert teacher_rows[1].item() == 0 * 4 + 3


@pytest.mark.parametrize("size,patch", SIZES)
def test_resize_paste_block_is_patch_aligned_on_a_uniform_grey(size, patch):
    image = torch.rand(3, size, size, generator=generator(4))
    seen_crops = 0
    for i in range(40):
        params = sample_resize_paste(size, patch, generator(9, i))
        paste, crop = params.paste, params.crop
        assert paste.top % patch == 0 and paste.left % patch == 0
        assert paste.height % patch == 0 and paste.width % patch == 0 and paste.height >= patch
        assert paste.top + paste.height <= size and paste.left + paste.width <= size
        assert (
            0.5 * size - patch <= paste.height <= 0.9 * size
            and 0.5 * size - patch <= paste.width <= 0.9 * size
        )
        seen_crops += crop.height < size or crop.width < size
        out = resize_paste(image, params)
        block = out[:, paste.top : paste.top + paste.height, paste.left : paste.left + paste.width]
        # the block is a bicubic, antialiased resize of the crop
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        expected = TF.resized_crop(
            image,
            crop.top,
            crop.left,
            crop.height,
            crop.width,
            [paste.height, paste.width],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        assert torch.equal(block, expected)
        background = out.clone()
        background[:, paste.top : paste.top + paste.height, paste.left : paste.left + paste.width] = (
            params.grey
        )
        assert torch.all(background == params.grey)  # one grey, the same on every channel
        assert 0 <= params.grey <= 1
    assert 15 <= seen_crops <= 40  # the crop is taken with p = 0.7, else the whole source


def _photo(size=(40, 52), seed=0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _invariance_dataset(source, rank=0, kinds=frozenset({"raw", "resizepaste"}), size=28, patch=7):
    augmentation = MultiCropAugmentation(global_crops_size=size, local_crops_size=14, local_crops_number=2)
    views = InvarianceViews(InvarianceSettings(size, patch, (0.5,) * 3, (0.25,) * 3))
    return SSLTrainDataset(source, augmentation, seed=3, rank=rank, invariance=views, invariance_kinds=kinds)


def _photo_list(tmp_path, count=6):
    for i in range(count):
        _photo(seed=i).save(tmp_path / f"p{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(f"p{i}.png" for i in range(count)) + "\n")
    return ImageListDataset(tmp_path / "list.txt")


def test_sources_and_views_shapes_and_keyed_randomness(tmp_path):
    source = _photo_list(tmp_path)
    sample = _invariance_dataset(source)[(0, 7)]
    aux = sample["invariance"]
    assert set(aux) == {"raw_r", "raw_o", "resizepaste_r", "resizepaste_o", "roll_r", "roll_o"}
    assert all(aux[k].shape == (3, 28, 28) and aux[k].dtype == torch.float32 for k in aux if "roll" not in k)
    assert aux["roll_r"].abs().max() <= 5
    # the same seed, rank and position: the same views; the multi-crop views are those without invariance
    again = _invariance_dataset(source)[(0, 7)]
    assert all(torch.equal(aux[k], again["invariance"][k]) for k in aux)
    plain = SSLTrainDataset(source, _invariance_dataset(source).transform, seed=3, rank=0)[(0, 7)]
    assert all(torch.equal(a, b) for a, b in zip(plain["global_crops"], sample["global_crops"]))
    assert all(torch.equal(a, b) for a, b in zip(plain["local_crops"], sample["local_crops"]))
    # a kind never depends on which other kinds are built
    raw_only = _invariance_dataset(source, kinds=frozenset({"raw"}))[(0, 7)]["invariance"]
    assert set(raw_only) == {"raw_r", "raw_o", "roll_r", "roll_o"}
    assert all(torch.equal(raw_only[k], aux[k]) for k in raw_only)
    # two ranks and two stream positions never draw the same geometry (same image)
    draws = {}
    for rank in (0, 1):
        for position in (0, 6):
            views = _invariance_dataset(source, rank=rank)[(0, position)]["invariance"]
            draws[(rank, position)] = views
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            for kind in ("resizepaste_r", "resizepaste_o", "raw_r"):
                assert not torch.equal(draws[a][kind], draws[b][kind]), (a, b, kind)


def test_source_o_is_the_whole_image_at_the_global_size():
    views = InvarianceViews(InvarianceSettings(28, 7, (0.0,) * 3, (1.0,) * 3, o_squash_probability=1.0))
    pixels = torch.arange(3 * 40 * 56, dtype=torch.float32).reshape(3, 40, 56).remainder(255).to(torch.uint8)
    squashed = views.source_o(pixels, generator(0))
    assert squashed.shape == (3, 28, 28)
    views = InvarianceViews(InvarianceSettings(28, 7, (0.0,) * 3, (1.0,) * 3, o_squash_probability=0.0))
    cropped = views.source_o(pixels, generator(0))
    assert cropped.shape == (3, 28, 28) and not torch.equal(cropped, squashed)


def _collate(**options):
    defaults = dict(patch_size=7, mask_probability=0.5, mask_ratio_min_max=(0.1, 0.5), seed=3, rank=0)
    return MultiCropCollate(**{**defaults, **options})


@pytest.mark.parametrize("use_all_shift_mask", [True, False])
def test_invariance_masks_have_exact_counts(tmp_path, use_all_shift_mask):
    dataset = _invariance_dataset(_photo_list(tmp_path))
    samples = [dataset[(i % 6, i)] for i in range(8)]
    collate = _collate(
        align_probability=0.5, align_ratio_min_max=(0.2, 0.4), use_all_shift_mask=use_all_shift_mask
    )
    batch = collate(samples)
    assert batch["views"]["raw_r"].shape == (8, 3, 28, 28) and batch["rolls"]["o"].shape == (8, 2)
    counts = {kind: batch["masks"][kind].masks.sum(1) for kind in batch["masks"]}
    # iBOT-style input masks: ⌊8·0.5⌋ images with ⌊16·r⌋ patches, r = linspace(0.1, 0.5, 5)[1:]
    expected = sorted([int(16 * r + 1e-6) for r in np.linspace(0.1, 0.5, 5)[1:]] + [0] * 4)
    for kind in ("resizepaste_r", "resizepaste_o", "shift_r", "shift_o"):
        assert sorted(counts[kind].tolist()) == expected, kind
    # the alignment set: ⌊8·0.5⌋ images with ⌊16·r⌋ positions, r = linspace(0.2, 0.4, 5)[1:]
    assert sorted(counts["align"].tolist()) == [0, 0, 0, 0, 4, 4, 5, 6]  # 16·(0.25, 0.3, 0.35, 0.4)
    align = batch["masks"]["align"].masks
    overlap = [(batch["masks"][f"shift_{s}"].masks & align).any().item() for s in ("r", "o")]
    if not use_all_shift_mask:
        assert not any(overlap)  # every aligned position was seen unmasked by the student
    # the same batch again (another worker, a resumed run): identical
    again = collate(samples)
    for kind in batch["masks"]:
        assert torch.equal(batch["masks"][kind].masks, again["masks"][kind].masks)
    # the iBOT masks do not change when the invariance views are present
    plain = [{k: v for k, v in s.items() if k != "invariance"} for s in samples]
    assert torch.equal(collate(plain)["masks"]["global"].masks, batch["masks"]["global"].masks)


def _loader_batches(dataset, num_workers, start, count, batch_size=2):
    sampler = ShardedInfiniteSampler(len(dataset), rank=0, world_size=1, seed=3, start=start)
    loader = build_train_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, sampler=sampler, collate=_collate()
    )
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(count)]
    del iterator, loader
    return batches


def test_resumed_views_equal_the_uninterrupted_run_with_two_workers(tmp_path):
    dataset = _invariance_dataset(_photo_list(tmp_path, count=5))
    uninterrupted = _loader_batches(dataset, 0, start=0, count=5)
    resumed = _loader_batches(dataset, 2, start=4, count=3)  # positions 4.. on two workers
    for a, b in zip(uninterrupted[2:], resumed):
        assert torch.equal(a["positions"], b["positions"])
        for kind in a["views"]:
            assert torch.equal(a["views"][kind], b["views"][kind]), kind
        for kind in a["masks"]:
            assert torch.equal(a["masks"][kind].masks, b["masks"][kind].masks), kind
        for source in a["rolls"]:
            assert torch.equal(a["rolls"][source], b["rolls"][source])


def test_data_kinds_follow_the_view_names():
    assert data_kinds_for(["global", "local"]) == frozenset()
    assert data_kinds_for(["raw_r", "shift_o"]) == {"raw"}
    assert data_kinds_for(["resizepaste_r"]) == {"raw", "resizepaste"}
