import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino_bridge.data.transforms import (
    FULL_IMAGE,
    CropBox,
    EvalTransform,
    MultiCropAugmentation,
    MultiCropParams,
    ViewParams,
    sample_resized_crop_box,
)
from dino_bridge.seeding import generator

G, L = 24, 12


def _photo(height=40, width=56, seed=0):
    """A smooth synthetic 'photo' (gradients + a disc) so blur and jitter have visible effects."""
    y, x = np.mgrid[0:height, 0:width]
    red = 255 * x / (width - 1)
    green = 255 * y / (height - 1)
    blue = np.where((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2, 230, 30)
    noise = np.random.RandomState(seed).randint(-20, 20, (height, width))
    pixels = np.stack([red, green, blue], -1) + noise[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _augmentation(**overrides):
    options = dict(global_crops_size=G, local_crops_size=L, local_crops_number=3)
    options.update(overrides)
    return MultiCropAugmentation(**options)


def test_views_sizes_count_dtype():
    out = _augmentation()(_photo(), generator(0))
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    assert all(t.shape == (3, G, G) and t.dtype == torch.float32 for t in out["global_crops"])
    assert all(t.shape == (3, L, L) and t.dtype == torch.float32 for t in out["local_crops"])
    assert _augmentation(local_crops_number=0)(_photo(), generator(0))["local_crops"] == []


def test_normalisation_uses_mean_and_std():
    image, seed = _photo(), 5
    raw = _augmentation(rgb_mean=(0, 0, 0), rgb_std=(1, 1, 1))(image, generator(seed))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = _augmentation(rgb_mean=mean, rgb_std=std)(image, generator(seed))
    for a, b in zip(
        raw["global_crops"] + raw["local_crops"], normalised["global_crops"] + normalised["local_crops"]
    ):
        assert a.min() >= 0.0 and a.max() <= 1.0
        expected = (a - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(b, expected)
    # Normalised views are roughly centred (loose: one synthetic image).
    stacked = torch.cat([t.flatten() for t in normalised["global_crops"]])
    assert -1.5 < stacked.mean() < 1.5 and 0.3 < stacked.std() < 3.0


def test_same_seed_same_views_different_seed_differs():
    image, augmentation = _photo(), _augmentation(horizontal_flips=True)
    first, again = augmentation(image, generator(1, 2, 3)), augmentation(image, generator(1, 2, 3))
    other = augmentation(image, generator(1, 2, 4))
    for key in ("global_crops", "local_crops"):
        for a, b in zip(first[key], again[key]):
            assert torch.equal(a, b)
    assert not torch.equal(first["global_crops"][0], other["global_crops"][0])


def _frequencies(augmentation, samples=1500):
    params = [augmentation.sample_params((40, 56), generator("freq", i)) for i in range(samples)]

    def rate(pick):
        return float(np.mean([pick(p) for p in params]))

    return params, rate


def test_decision_probabilities():
    augmentation = _augmentation(local_crops_number=2)
    params, rate = _frequencies(augmentation)
    blurred = lambda view: view.blur_sigma is not None  # noqa: E731
    assert rate(lambda p: blurred(p.global_views[0])) == 1.0
    assert abs(rate(lambda p: blurred(p.global_views[1])) - 0.1) < 0.03
    assert abs(rate(lambda p: np.mean([blurred(v) for v in p.local_views])) - 0.5) < 0.04
    assert rate(lambda p: p.global_views[0].solarize) == 0.0
    assert abs(rate(lambda p: p.global_views[1].solarize) - 0.2) < 0.035
    assert rate(lambda p: any(v.solarize for v in p.local_views)) == 0.0
    assert abs(rate(lambda p: p.global_views[0].color_jitter is not None) - 0.8) < 0.035
    assert abs(rate(lambda p: p.local_views[1].grayscale) - 0.2) < 0.035
    assert rate(lambda p: p.global_views[0].flip) == 0.0  # horizontal_flips=False
    sigmas = [v.blur_sigma for p in params for v in p.global_views if v.blur_sigma is not None]
    assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0
    jitters = [p.global_views[0].color_jitter for p in params if p.global_views[0].color_jitter]
    assert all(
        0.6 <= j.brightness <= 1.4 and 0.8 <= j.saturation <= 1.2 and abs(j.hue) <= 0.1 for j in jitters
    )
    assert len({j.order for j in jitters}) == 24  # all orders of the 4 ops occur

    _, flip_rate = _frequencies(_augmentation(horizontal_flips=True), samples=600)
    assert abs(flip_rate(lambda p: p.global_views[0].flip) - 0.5) < 0.07


def test_crop_boxes_follow_scale_and_aspect():
    for i in range(300):
        box = sample_resized_crop_box(100, 150, (0.05, 0.32), (3 / 4, 4 / 3), generator("box", i))
        assert box.top >= 0 and box.top + box.height <= 100
        assert box.left >= 0 and box.left + box.width <= 150
        area_fraction = box.height * box.width / (100 * 150)
        assert 0.04 < area_fraction < 0.34
        assert 3 / 4 - 0.1 < box.width / box.height < 4 / 3 + 0.1
    # An image far outside the aspect range always falls back to the clamped central crop.
    box = sample_resized_crop_box(10, 200, (0.9, 1.0), (3 / 4, 4 / 3), generator(0))
    assert box == CropBox(top=0, left=(200 - 13) // 2, height=10, width=13)


def _plain_view(box, **changes):
    view = dict(box=box, source=FULL_IMAGE, flip=False, color_jitter=None, grayscale=False, blur_sigma=None)
    view.update(changes)
    return ViewParams(solarize=view.pop("solarize", False), **view)


def test_apply_executes_the_params():
    augmentation = _augmentation(local_crops_number=0, rgb_mean=(0, 0, 0), rgb_std=(1, 1, 1))
    image = _photo()
    pixels = TF.pil_to_tensor(image)
    box = CropBox(3, 5, 20, 30)
    params = MultiCropParams(
        global_views=(_plain_view(box), _plain_view(box, flip=True, solarize=True)), local_views=()
    )
    out = augmentation.apply(image, params)
    expected = TF.resized_crop(
        pixels, 3, 5, 20, 30, [G, G], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    torch.testing.assert_close(out["global_crops"][0], expected.float() / 255)
    solarized = TF.solarize(TF.horizontal_flip(expected), 128)
    torch.testing.assert_close(out["global_crops"][1], solarized.float() / 255)
    blurred = augmentation.apply(image, MultiCropParams((_plain_view(box, blur_sigma=2.0),) * 2, ()))
    assert (
        blurred["global_crops"][0].diff(dim=-1).abs().mean()
        < out["global_crops"][0].diff(dim=-1).abs().mean()
    )
    gray = augmentation.apply(image, MultiCropParams((_plain_view(box, grayscale=True),) * 2, ()))
    assert torch.equal(gray["global_crops"][0][0], gray["global_crops"][0][1])


def test_share_color_jitter_and_local_subset():
    augmentation = _augmentation(
        share_color_jitter=True, localcrops_subset_of_globalcrops=True, local_crops_number=4
    )
    sources = set()
    for i in range(20):
        params = augmentation.sample_params((40, 56), generator("share", i))
        views = params.global_views + params.local_views
        assert len({(v.color_jitter, v.grayscale) for v in views}) == 1
        for view in params.local_views:
            sources.add(view.source)
            assert view.box.top + view.box.height <= G and view.box.left + view.box.width <= G
    assert sources == {0, 1}
    out = augmentation(_photo(), generator(0))
    assert all(t.shape == (3, L, L) for t in out["local_crops"])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="global_crops_scale"):
        _augmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="local_crops_number"):
        _augmentation(local_crops_number=-1)
    with pytest.raises(ValueError, match="mode"):
        _augmentation()(Image.new("L", (8, 8)), generator(0))


def test_eval_transform_resize_center_crop_deterministic():
    image = _photo(40, 60)
    transform = EvalTransform(16, rgb_mean=(0, 0, 0), rgb_std=(1, 1, 1), resize_ratio=2.0)
    out = transform(image)
    assert out.shape == (3, 16, 16) and torch.equal(out, transform(image))
    resized = TF.resize(
        TF.pil_to_tensor(image), [32], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    assert resized.shape[-2:] == (32, 48)
    torch.testing.assert_close(out, resized[:, 8:24, 16:32].float() / 255)
    assert math.isclose(EvalTransform(224).resize_size, 256)
