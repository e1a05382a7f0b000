"""Multi-crop DINO augmentation and the deterministic evaluation transform.

Shapes: G global crop size, L local crop size, H×W source image. All tensors are channel-first.

Every random number comes from the ``torch.Generator`` passed in, in two steps so the random decisions
can be tested without touching pixels:
1. ``MultiCropAugmentation.sample_params(image_size, generator)`` draws every parameter of every view
   (crop box, flip, colour jitter, grayscale, blur, solarize) into a frozen ``MultiCropParams``;
2. ``apply(image, params)`` executes them.

Two view pipelines execute the same parameters (``view_pipeline``, ``VIEW_PIPELINES``):
``reference`` runs ``torchvision.transforms.v2.functional``'s uint8 ops one after the other (the
golden-loss path); ``fast`` (``data/fast_ops.py``) converts each crop to float once after its
resized crop and runs the photometric ops and the normalisation in one float pass (its output
distribution is tested against ``reference``; pixels differ by the reference's rounding between ops).

The recipe (METHOD §2): RandomResizedCrop (bicubic, antialias, aspect 3/4–4/3, torchvision's sampling
algorithm), horizontal flip p=0.5 if enabled, colour jitter p=0.8 (0.4, 0.4, 0.2, 0.1) in a random order,
grayscale p=0.2, Gaussian blur (kernel 9, sigma U(0.1, 2)) with p = 1.0 on global 1, 0.1 on global 2 and
0.5 on each local (the DINO papers' values, not the reference code's inverted ones), solarize p=0.2 on
global 2 only, then float [0, 1] and normalisation. Photometric ops run on the small uint8 crops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
FLIP_PROBABILITY = 0.5
COLOR_JITTER_PROBABILITY = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_PROBABILITY = 0.2
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA_RANGE = (0.1, 2.0)
GLOBAL_BLUR_PROBABILITIES = (1.0, 0.1)
LOCAL_BLUR_PROBABILITY = 0.5
GLOBAL_SOLARIZE_PROBABILITIES = (0.0, 0.2)
SOLARIZE_THRESHOLD_UINT8 = 128
FULL_IMAGE = -1  # ViewParams.source value: crop from the input image, not from a global crop


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class ColorJitterParams:
    order: tuple[int, ...]  # permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class ViewParams:
    box: CropBox
    source: int  # FULL_IMAGE, or 0/1: crop from the geometric part (crop + flip) of that global crop
    flip: bool
    color_jitter: ColorJitterParams | None  # None: jitter not applied
    grayscale: bool
    blur_sigma: float | None  # None: no blur
    solarize: bool


@dataclass(frozen=True)
class MultiCropParams:
    global_views: tuple[ViewParams, ...]
    local_views: tuple[ViewParams, ...]


def _uniform(low: float, high: float, unit: float) -> float:
    return low + (high - low) * unit


def sample_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> CropBox:
    """torchvision's RandomResizedCrop box sampling with an explicit generator.

    Up to 10 attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first box that fits
    is placed uniformly; otherwise a central crop clamped to the aspect range. A fixed number of draws
    (22 uniforms) is consumed whatever the outcome.
    """
    draws = torch.rand(11, 2, generator=generator, dtype=torch.float64).tolist()
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for unit_scale, unit_ratio in draws[:10]:
        target_area = area * _uniform(scale[0], scale[1], unit_scale)
        aspect_ratio = math.exp(_uniform(log_ratio[0], log_ratio[1], unit_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            unit_top, unit_left = draws[10]
            top = int(unit_top * (height - crop_height + 1))
            left = int(unit_left * (width - crop_width + 1))
            return CropBox(top, left, crop_height, crop_width)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height, crop_width = height, int(round(height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def _sample_color_jitter(generator: torch.Generator) -> ColorJitterParams | None:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) applied with p=0.8; always 5 uniforms + one randperm(4)."""
    unit_apply, unit_b, unit_c, unit_s, unit_h = torch.rand(
        5, generator=generator, dtype=torch.float64
    ).tolist()
    order = tuple(torch.randperm(4, generator=generator).tolist())
    if unit_apply >= COLOR_JITTER_PROBABILITY:
        return None
    return ColorJitterParams(
        order=order,
        brightness=_uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, unit_b),
        contrast=_uniform(1 - CONTRAST, 1 + CONTRAST, unit_c),
        saturation=_uniform(1 - SATURATION, 1 + SATURATION, unit_s),
        hue=_uniform(-HUE, HUE, unit_h),
    )


def apply_color_jitter(image: torch.Tensor, params: ColorJitterParams) -> torch.Tensor:
    for op in params.order:
        if op == 0:
            image = TF.adjust_brightness(image, params.brightness)
        elif op == 1:
            image = TF.adjust_contrast(image, params.contrast)
        elif op == 2:
            image = TF.adjust_saturation(image, params.saturation)
        else:
            image = TF.adjust_hue(image, params.hue)
    return image


@dataclass(frozen=True)
class PixelOps:
    """The photometric part of a view: what ``apply_pixel_ops`` does to a uint8 crop."""

    color_jitter: ColorJitterParams | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def sample_pixel_ops(
    generator: torch.Generator, blur_probability: float, solarize_probability: float
) -> tuple[float, PixelOps]:
    """(the flip uniform, the photometric draws) of one view: 5 uniforms, then the colour jitter."""
    unit_flip, unit_gray, unit_blur, unit_sigma, unit_solarize = torch.rand(
        5, generator=generator, dtype=torch.float64
    ).tolist()
    color_jitter = _sample_color_jitter(generator)
    return unit_flip, PixelOps(
        color_jitter=color_jitter,
        grayscale=unit_gray < GRAYSCALE_PROBABILITY,
        blur_sigma=_uniform(*BLUR_SIGMA_RANGE, unit_sigma) if unit_blur < blur_probability else None,
        solarize=unit_solarize < solarize_probability,
    )


def apply_pixel_ops(crop: torch.Tensor, ops: PixelOps | ViewParams) -> torch.Tensor:
    """Colour jitter → grayscale → blur → solarize on a uint8 [3, h, w] crop (uint8 out)."""
    if ops.color_jitter is not None:
        crop = apply_color_jitter(crop, ops.color_jitter)
    if ops.grayscale:
        crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
    if ops.blur_sigma is not None:
        crop = TF.gaussian_blur(crop, [BLUR_KERNEL_SIZE] * 2, [ops.blur_sigma] * 2)
    if ops.solarize:
        crop = TF.solarize(crop, SOLARIZE_THRESHOLD_UINT8)
    return crop


class ReferencePixels:
    """The ``reference`` view pipeline's pixel stage: torchvision's uint8 ops, then float."""

    name = "reference"

    def resized_crop(self, image: torch.Tensor, box: CropBox, height: int, width: int) -> torch.Tensor:
        """The ``box`` of ``image`` [3, H, W] resized to height×width (bicubic, antialias)."""
        return TF.resized_crop(
            image,
            box.top,
            box.left,
            box.height,
            box.width,
            [height, width],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )

    def to_float(self, crop: torch.Tensor) -> torch.Tensor:
        return TF.to_dtype(crop, torch.float32, scale=True)

    def photometric(self, crop: torch.Tensor, ops: PixelOps | ViewParams) -> torch.Tensor:
        """uint8 crop → float32 [0, 1] after its photometric ops."""
        return self.to_float(apply_pixel_ops(crop, ops))

    def normalize(self, image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        return TF.normalize(image, list(mean), list(std))


VIEW_PIPELINES = ("reference", "fast")


def pixel_pipeline(name: str):
    """The pixel stage of the view pipeline ``name`` (one of ``VIEW_PIPELINES``)."""
    if name == "reference":
        return ReferencePixels()
    if name == "fast":
        from dino_bridge.data.fast_ops import FastPixels  # fast_ops builds on this module's types

        return FastPixels()
    raise ValueError(f"unknown view pipeline {name!r}; valid: {', '.join(VIEW_PIPELINES)}")


def image_to_uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB PIL image (or a uint8 [3, H, W] tensor) as a plain uint8 [3, H, W] tensor."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r} (use load_image)")
        return TF.pil_to_tensor(image)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")
    return image.as_subclass(torch.Tensor)


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in scale)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    return low, high


class MultiCropAugmentation:
    """Two global and ``local_crops_number`` local views of one image (see the module docstring).

    ``share_color_jitter``: one colour-jitter and grayscale draw is used for every crop (applied per crop
    after cropping; contrast uses each crop's own mean). ``localcrops_subset_of_globalcrops``: each local
    crop is cut from the geometric part (crop + flip) of a randomly chosen global crop.
    ``view_pipeline``: ``reference`` or ``fast`` (see the module docstring); the random draws are
    the same for both.
    """

    def __init__(
        self,
        *,
        global_crops_size: int,
        local_crops_size: int,
        local_crops_number: int,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        horizontal_flips: bool = False,
        rgb_mean: Sequence[float] = IMAGENET_MEAN,
        rgb_std: Sequence[float] = IMAGENET_STD,
        share_color_jitter: bool = False,
        localcrops_subset_of_globalcrops: bool = False,
        view_pipeline: str = "reference",
    ) -> None:
        for name, value in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if int(local_crops_number) < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if len(rgb_mean) != 3 or len(rgb_std) != 3 or min(rgb_std) <= 0:
            raise ValueError(f"rgb_mean/rgb_std must be 3 values (std > 0), got {rgb_mean} / {rgb_std}")
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.horizontal_flips = bool(horizontal_flips)
        self.rgb_mean = [float(v) for v in rgb_mean]
        self.rgb_std = [float(v) for v in rgb_std]
        self.share_color_jitter = bool(share_color_jitter)
        self.localcrops_subset_of_globalcrops = bool(localcrops_subset_of_globalcrops)
        self.pixels = pixel_pipeline(view_pipeline)
        self.view_pipeline = self.pixels.name

    def _sample_view(
        self,
        generator: torch.Generator,
        *,
        source_size: tuple[int, int],
        source: int,
        scale: tuple[float, float],
        blur_probability: float,
        solarize_probability: float,
        shared_jitter: tuple[ColorJitterParams | None, bool] | None,
    ) -> ViewParams:
        box = sample_resized_crop_box(source_size[0], source_size[1], scale, ASPECT_RATIO_RANGE, generator)
        unit_flip, pixel_ops = sample_pixel_ops(generator, blur_probability, solarize_probability)
        if shared_jitter is not None:
            pixel_ops = dataclasses.replace(
                pixel_ops, color_jitter=shared_jitter[0], grayscale=shared_jitter[1]
            )
        return ViewParams(
            box=box,
            source=source,
            flip=self.horizontal_flips and unit_flip < FLIP_PROBABILITY,
            color_jitter=pixel_ops.color_jitter,
            grayscale=pixel_ops.grayscale,
            blur_sigma=pixel_ops.blur_sigma,
            solarize=pixel_ops.solarize,
        )

    def sample_params(self, image_size: tuple[int, int], generator: torch.Generator) -> MultiCropParams:
        """Every random decision for one image of ``image_size`` = (H, W)."""
        height, width = int(image_size[0]), int(image_size[1])
        shared_jitter = None
        if self.share_color_jitter:
            jitter = _sample_color_jitter(generator)
            gray = torch.rand(1, generator=generator, dtype=torch.float64).item() < GRAYSCALE_PROBABILITY
            shared_jitter = (jitter, gray)
        global_views = tuple(
            self._sample_view(
                generator,
                source_size=(height, width),
                source=FULL_IMAGE,
                scale=self.global_crops_scale,
                blur_probability=GLOBAL_BLUR_PROBABILITIES[k],
                solarize_probability=GLOBAL_SOLARIZE_PROBABILITIES[k],
                shared_jitter=shared_jitter,
            )
            for k in range(2)
        )
        local_views = []
        for _ in range(self.local_crops_number):
            if self.localcrops_subset_of_globalcrops:
                source = int(torch.randint(0, 2, (1,), generator=generator).item())
                source_size = (self.global_crops_size, self.global_crops_size)
            else:
                source, source_size = FULL_IMAGE, (height, width)
            local_views.append(
                self._sample_view(
                    generator,
                    source_size=source_size,
                    source=source,
                    scale=self.local_crops_scale,
                    blur_probability=LOCAL_BLUR_PROBABILITY,
                    solarize_probability=0.0,
                    shared_jitter=shared_jitter,
                )
            )
        return MultiCropParams(global_views=global_views, local_views=tuple(local_views))

    def _geometric(self, source: torch.Tensor, view: ViewParams, size: int) -> torch.Tensor:
        crop = self.pixels.resized_crop(source, view.box, size, size)
        return TF.horizontal_flip(crop) if view.flip else crop

    def normalize(self, crop: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] → float32, scaled to [0, 1], then (x − rgb_mean) / rgb_std."""
        return self.pixels.normalize(self.pixels.to_float(crop), self.rgb_mean, self.rgb_std)

    def _photometric(self, crop: torch.Tensor, view: ViewParams) -> torch.Tensor:
        return self.pixels.normalize(self.pixels.photometric(crop, view), self.rgb_mean, self.rgb_std)

    def apply(
        self, image: Image.Image | torch.Tensor, params: MultiCropParams, *, keep_geometric: bool = False
    ) -> dict[str, list[torch.Tensor]]:
        """Execute ``params`` on ``image``: {"global_crops": 2 × [3, G, G], "local_crops": n × [3, L, L]}
        (normalised float32); with ``keep_geometric`` also "geometric_globals": the two global crops
        after crop + flip only (uint8), from which the invariance sources are built."""
        pixels = image_to_uint8_tensor(image)
        geometric_globals = [
            self._geometric(pixels, view, self.global_crops_size) for view in params.global_views
        ]
        global_crops = [
            self._photometric(crop, view) for crop, view in zip(geometric_globals, params.global_views)
        ]
        local_crops = []
        for view in params.local_views:
            source = pixels if view.source == FULL_IMAGE else geometric_globals[view.source]
            local_crops.append(self._photometric(self._geometric(source, view, self.local_crops_size), view))
        out = {"global_crops": global_crops, "local_crops": local_crops}
        if keep_geometric:
            out["geometric_globals"] = geometric_globals
        return out

    def __call__(
        self, image: Image.Image | torch.Tensor, generator: torch.Generator
    ) -> dict[str, list[torch.Tensor]]:
        pixels = image_to_uint8_tensor(image)
        return self.apply(pixels, self.sample_params(tuple(pixels.shape[-2:]), generator))


class EvalTransform:
    """Resize the short side to round(size·resize_ratio) (bicubic), centre-crop ``size``, normalise.

    Deterministic; used for kNN / linear-probe features.
    """

    def __init__(
        self,
        size: int,
        rgb_mean: Sequence[float] = IMAGENET_MEAN,
        rgb_std: Sequence[float] = IMAGENET_STD,
        resize_ratio: float = 256 / 224,
    ) -> None:
        if int(size) <= 0 or resize_ratio < 1.0:
            raise ValueError(
                f"EvalTransform needs size > 0 and resize_ratio >= 1, got {size}, {resize_ratio}"
            )
        self.size = int(size)
        self.resize_size = int(round(self.size * resize_ratio))
        self.rgb_mean = [float(v) for v in rgb_mean]
        self.rgb_std = [float(v) for v in rgb_std]

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels = image_to_uint8_tensor(image)
        pixels = TF.resize(
            pixels, [self.resize_size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        pixels = TF.center_crop(pixels, [self.size, self.size])
        return TF.normalize(TF.to_dtype(pixels, torch.float32, scale=True), self.rgb_mean, self.rgb_std)
