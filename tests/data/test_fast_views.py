"""The fast view pipeline (``crops.view_pipeline: fast``) against the reference one.

Both execute the same ``MultiCropParams`` (the draws are shared), so the comparisons are paired:
per op against torchvision (within the reference's rounding), then per view kind on real photos
(the ones shipped in scikit-image, the ``[bench]`` extra): per-channel mean and std, the histogram
of hue shifts (measured with PIL's own HSV conversion) and the blur strength.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dino_bridge.data import fast_ops
from dino_bridge.data.invariance import InvarianceSettings, InvarianceViews
from dino_bridge.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitterParams,
    CropBox,
    MultiCropAugmentation,
    PixelOps,
    ReferencePixels,
    image_to_uint8_tensor,
    pixel_pipeline,
)
from dino_bridge.seeding import generator

G, L, PATCH = 112, 48, 16
STEP = 1.0 / 255.0  # one uint8 level in [0, 1]
LOW = (0.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
HIGH = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Three real photos at an ImageNet-like size (landscape and portrait)."""
    sk = pytest.importorskip("skimage.data", reason="the real photos come with scikit-image ([bench])")
    out = []
    for name, size in (("astronaut", (250, 188)), ("chelsea", (250, 188)), ("coffee", (188, 250))):
        out.append(Image.fromarray(np.asarray(getattr(sk, name)())[..., :3]).resize(size, Image.BICUBIC))
    return out


def _crop(photo: Image.Image, size: int = 96) -> torch.Tensor:
    return TF.center_crop(image_to_uint8_tensor(photo), [size, size]).contiguous()


def _pair(pipeline: str):
    aug = MultiCropAugmentation(
        global_crops_size=G, local_crops_size=L, local_crops_number=4, view_pipeline=pipeline
    )
    inv = InvarianceViews(InvarianceSettings(G, PATCH, IMAGENET_MEAN, IMAGENET_STD, view_pipeline=pipeline))
    return aug, inv


def _views(pipeline: str, photo: Image.Image, seed: int) -> dict[str, torch.Tensor]:
    """Every view of one image, keyed: global_0, global_1, local_k, raw_r, resizepaste_r, …"""
    aug, inv = _pair(pipeline)
    pixels = image_to_uint8_tensor(photo)
    params = aug.sample_params(tuple(pixels.shape[-2:]), generator(seed, 0, "views", 0))
    views = aug.apply(pixels, params, keep_geometric=True)
    out = {f"global_{k}": v for k, v in enumerate(views["global_crops"])}
    out.update({f"local_{k}": v for k, v in enumerate(views["local_crops"])})
    out.update(inv(pixels, params, views["geometric_globals"], lambda kind: generator(seed, 0, kind)))
    return out


# ------------------------------------------------------------------------------- op by op
def test_each_fast_op_matches_torchvision_within_its_rounding(photos):
    crop = _crop(photos[1])
    image = crop.float() / 255
    for hue in (-0.1, -0.04, 0.0, 0.03, 0.1, 0.5):
        ref = TF.adjust_hue(crop, hue).float() / 255
        assert (fast_ops.adjust_hue(image, hue) - ref).abs().max() <= STEP + 1e-6, hue
    references = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for factor in (0.6, 1.0, 1.4):
        for op, reference_op in enumerate(references):
            params = ColorJitterParams((op,), factor, factor, factor, 0.0)  # the one op alone
            ref = reference_op(crop, factor).float() / 255
            # the uint8 blend truncates (one level) and contrast's grey mean is of floored values
            fast = fast_ops.apply_color_jitter(image.clone(), params)
            assert (fast - ref).abs().max() <= 1.5 * STEP, (reference_op, factor)
    for sigma in (0.1, 0.7, 2.0):
        ref = TF.gaussian_blur(crop, [9, 9], [sigma, sigma]).float() / 255
        assert (fast_ops.gaussian_blur(image, sigma) - ref).abs().max() <= 0.5 * STEP + 1e-5, sigma
    gray = TF.rgb_to_grayscale(crop, num_output_channels=1).float() / 255
    assert (fast_ops.grayscale(image) - gray).abs().max() <= STEP + 1e-6
    solarized = TF.solarize(crop, 128).float() / 255
    assert torch.allclose(fast_ops.solarize_(image.clone()), solarized, atol=1e-6)


def test_fast_resized_crop_equals_torchvision(photos):
    pixels = image_to_uint8_tensor(photos[0])  # PIL's channels-last layout
    box = CropBox(10, 20, 150, 170)
    fast, reference = pixel_pipeline("fast"), ReferencePixels()
    assert torch.equal(fast.resized_crop(pixels, box, G, G), reference.resized_crop(pixels, box, G, G))
    image = pixels.float() / 255
    assert torch.allclose(fast.resized_crop(image, box, 64, 80), reference.resized_crop(image, box, 64, 80))
    assert torch.equal(fast.resized_crop(pixels, CropBox(0, 0, 30, 40), 30, 40), pixels[:, :30, :40])


def test_fast_photometric_chain_matches_reference_chain(photos):
    crop = _crop(photos[0])
    jitter = ColorJitterParams(order=(3, 1, 0, 2), brightness=1.2, contrast=0.8, saturation=1.1, hue=-0.07)
    for ops in (
        PixelOps(jitter, grayscale=False, blur_sigma=1.5, solarize=True),
        PixelOps(jitter, grayscale=True, blur_sigma=None, solarize=False),
        PixelOps(None, grayscale=False, blur_sigma=None, solarize=False),
    ):
        ref = ReferencePixels().photometric(crop, ops)
        fast = pixel_pipeline("fast").photometric(crop, ops)
        assert fast.dtype == ref.dtype == torch.float32 and fast.shape == ref.shape
        assert (fast - ref).abs().max() <= 4 * STEP, ops
        assert (fast - ref).abs().mean() <= 1.5 * STEP, ops


def test_unknown_view_pipeline_is_an_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="reference, fast"):
        MultiCropAugmentation(
            global_crops_size=G, local_crops_size=L, local_crops_number=1, view_pipeline="turbo"
        )


# ------------------------------------------------------------------------- whole views
def test_fast_views_have_the_reference_shapes_dtypes_and_ranges(photos):
    ref, fast = _views("reference", photos[2], seed=3), _views("fast", photos[2], seed=3)
    assert ref.keys() == fast.keys()
    low = torch.tensor(LOW, dtype=torch.float32).view(3, 1, 1) - 1e-4
    high = torch.tensor(HIGH, dtype=torch.float32).view(3, 1, 1) + 1e-4
    for kind, view in fast.items():
        assert view.shape == ref[kind].shape and view.dtype == ref[kind].dtype, kind
        if kind.startswith("roll_"):
            assert torch.equal(view, ref[kind]), kind  # the draws are shared
            continue
        assert view.is_contiguous() and torch.isfinite(view).all(), kind
        if not kind.startswith("resizepaste_"):  # resize-paste keeps bicubic overshoot (both pipelines)
            assert ((view >= low) & (view <= high)).all(), kind
        assert (view - ref[kind]).abs().mean() < 0.05, kind  # paired: the same decisions


def _per_channel_stats(views: list[dict[str, torch.Tensor]], group: str):
    kinds = [k for k in views[0] if k == group or k.startswith(group + "_")]
    pixels = torch.cat([v[k].flatten(1) for v in views for k in kinds], dim=1)
    return pixels.mean(dim=1), pixels.std(dim=1)


def test_per_view_statistics_agree_on_real_photos(photos):
    seeds = range(6)
    ref = [_views("reference", photo, seed) for photo in photos for seed in seeds]
    fast = [_views("fast", photo, seed) for photo in photos for seed in seeds]
    for group in ("global_0", "global_1", "local", "raw_r", "raw_o", "resizepaste_r", "resizepaste_o"):
        ref_mean, ref_std = _per_channel_stats(ref, group)
        fast_mean, fast_std = _per_channel_stats(fast, group)
        # normalised units (÷ std ≈ 0.225): 0.02 is ≈ 1.1 uint8 levels, the reference's truncation bias
        assert (fast_mean - ref_mean).abs().max() < 0.02, (group, fast_mean, ref_mean)
        assert ((fast_std - ref_std).abs() / ref_std).max() < 0.01, (group, fast_std, ref_std)


def _hue(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(hue in [0, 1), a mask of pixels with a well-defined hue) by PIL's HSV conversion."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV")).astype(np.float64)
    return hsv[..., 0] / 256.0, (hsv[..., 1] > 80) & (hsv[..., 2] > 60)


def _hue_shift_histogram(pixels, crops, shifts, bins):
    """The distribution of per-pixel hue shifts (output − input) over crops × hue factors."""
    counts = np.zeros(len(bins) - 1)
    for crop in crops:
        before, defined = _hue(crop.float() / 255)
        for hue in shifts:
            ops = PixelOps(ColorJitterParams((3, 0, 1, 2), 1.0, 1.0, 1.0, hue), False, None, False)
            after, defined_after = _hue(pixels.photometric(crop, ops))
            shift = (after - before + 0.5) % 1.0 - 0.5  # circular difference in [−0.5, 0.5)
            counts += np.histogram(shift[defined & defined_after], bins=bins)[0]
    return counts / counts.sum()


def test_hue_shift_histograms_agree(photos):
    crops = [_crop(photo, 64) for photo in photos]
    shifts = np.linspace(-0.1, 0.1, 9)
    bins = np.linspace(-0.15, 0.15, 31)
    ref = _hue_shift_histogram(ReferencePixels(), crops, shifts, bins)
    fast = _hue_shift_histogram(pixel_pipeline("fast"), crops, shifts, bins)
    assert 0.5 * np.abs(ref - fast).sum() < 0.05  # total variation distance
    centres = 0.5 * (bins[1:] + bins[:-1])
    assert abs((ref * centres).sum() - (fast * centres).sum()) < 0.002
    # and the histogram does see the shifts: a flipped sign would be far off
    flipped = _hue_shift_histogram(pixel_pipeline("fast"), crops, -shifts + 0.03, bins)
    assert 0.5 * np.abs(ref - flipped).sum() > 0.3


def test_blur_strength_agrees(photos):
    """Blur strength = mean |crop − blurred crop| (what the blur removes; the uint8 rounding of the
    reference adds under half a level to it), per sigma, on real-photo crops."""
    crops = [_crop(photo, 96) for photo in photos]
    sigmas = (0.5, 1.0, 1.5, 2.0)
    strengths = {}
    for name, pixels in (("reference", ReferencePixels()), ("fast", pixel_pipeline("fast"))):
        strengths[name] = np.array(
            [
                [
                    float(
                        (pixels.photometric(crop, PixelOps(None, False, sigma, False)) - crop / 255)
                        .abs()
                        .mean()
                    )
                    for crop in crops
                ]
                for sigma in sigmas
            ]
        )
    ref, fast = strengths["reference"], strengths["fast"]
    # at sigma 0.5 the blur moves pixels by ~2 levels, so the reference's rounding weighs more
    tolerance = np.array([0.05, 0.01, 0.01, 0.01])[:, None]
    assert (np.abs(fast / ref - 1) < tolerance).all(), (ref, fast)
    assert (np.diff(ref.mean(axis=1)) > 0).all() and ref[-1].min() > 3 * STEP  # the measure sees the blur
