"""The photometric ops of a view in one float pass: the ``fast`` view pipeline's kernels.

Shapes: h×w a crop; every image is float32 [3, h, w] with values in [0, 1] unless said otherwise.

The ``reference`` pipeline (``transforms.apply_pixel_ops``) runs torchvision's uint8 ops one after
the other: each converts its crop to float, works, rounds or truncates back to uint8; the hue shift
is a full RGB→HSV→HSV→RGB round trip with stacks and a gather, and the blur a 9×9 2-D convolution.
Here the crop is converted to float once, after the resized crop, and stays float through colour
jitter, grayscale, blur, solarize and normalisation:

- brightness, contrast, saturation, grayscale: the same blends, clamped to [0, 1], and floored to
  the uint8 levels after each as torchvision's uint8 ops truncate (``floor_levels_``; without it
  the fast views would be ≈ 1 level brighter on average); contrast's and saturation's grey is
  floored too, as there;
- hue: the same HSV hue rotation, computed without building HSV: with M = max, m = min and
  C = M − m of a pixel and its hue H' (in sixths of the circle, shifted), channel n ∈ {R: 5, G: 3,
  B: 1} is ``M − C·clamp(min(k, 4 − k), 0, 1)`` with ``k = (n + H') mod 6`` (the standard closed
  form of HSV → RGB);
- blur: the same 9-tap Gaussian (torchvision's kernel, reflect padding) as two 1-D passes;
- solarize: ``x ≥ 128/255 → 1 − x`` (the uint8 threshold 128);
- normalise: one multiply-add with 1/std and −mean/std.

The outputs differ from the reference by the rounding the reference does after its hue shift and
blur (unbiased, half a level each) and what that rounding changes downstream (a few levels at
most), never in the random decisions, which both pipelines take from the same ``PixelOps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dino_bridge.data.transforms import (
    BLUR_KERNEL_SIZE,
    SOLARIZE_THRESHOLD_UINT8,
    ColorJitterParams,
    CropBox,
    PixelOps,
)

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
LUMA = (0.2989, 0.587, 0.114)
# the hue (in sixths of the circle) of each output channel's primary: R 0, G 2, B 4
_HUE_CENTRES = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)


def floor_levels_(image: torch.Tensor) -> torch.Tensor:
    """In place: down to the uint8 level below (what a float → uint8 cast does), values in [0, 1].

    The 1e-3 of a level absorbs float error on values that are exact levels already."""
    return image.mul_(255.0).add_(1e-3).floor_().mul_(1.0 / 255.0)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """float [3, h, w] → the luma [1, h, w], floored to the uint8 levels."""
    r, g, b = image.unbind(0)
    return floor_levels_((r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(0))


def _blend_(image: torch.Tensor, other: torch.Tensor | float, ratio: float) -> torch.Tensor:
    """In place: ratio·image + (1 − ratio)·other, clamped to [0, 1] and floored to the levels."""
    image.mul_(ratio)
    if isinstance(other, torch.Tensor):
        image.add_(other, alpha=1.0 - ratio)
    else:
        image.add_((1.0 - ratio) * other)
    return floor_levels_(image.clamp_(0.0, 1.0))


def adjust_hue(image: torch.Tensor, hue: float) -> torch.Tensor:
    """Rotate the HSV hue of every pixel by ``hue`` (a fraction of the circle, in [−0.5, 0.5]).

    With H' the shifted hue in sixths, in [0, 6), channel c (centre 0 R, 2 G, 4 B) is
    ``M − C·clamp(d − 1, 0, 1)``, d the circular distance from H' to the centre (the closed form
    of HSV → RGB). Grey pixels (C = 0) stay as they are; value and saturation are kept.
    """
    r, g, b = image.unbind(0)
    low, high = torch.aminmax(image, dim=0)
    chroma = high - low
    inverse = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    # hue in sixths, from the channel that holds the maximum (R first, then G, as torchvision)
    hue6 = torch.where(
        high == r,
        (g - b).mul_(inverse),
        torch.where(high == g, (b - r).mul_(inverse).add_(2.0), (r - g).mul_(inverse).add_(4.0)),
    )
    hue6.add_(6.0 * hue).remainder_(6.0)
    distance = (hue6 - _HUE_CENTRES).abs_()  # [3, h, w]
    distance = torch.minimum(distance, 6.0 - distance)
    return distance.sub_(1.0).clamp_(0.0, 1.0).mul_(chroma).neg_().add_(high)


def apply_color_jitter(image: torch.Tensor, params: ColorJitterParams) -> torch.Tensor:
    """The jitter of ``params`` in its order, on a float image (modified in place where possible)."""
    for op in params.order:
        if op == 0:
            image = floor_levels_(image.mul_(params.brightness).clamp_(0.0, 1.0))
        elif op == 1:
            mean = float(grayscale(image).mean())
            image = _blend_(image, mean, params.contrast)
        elif op == 2:
            image = _blend_(image, grayscale(image), params.saturation)
        else:
            image = adjust_hue(image, params.hue)
    return image


def gaussian_kernel1d(sigma: float, size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel: exp(−x²/2σ²) at x = −(size−1)/2 … (size−1)/2, summed to 1."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size)
    kernel = torch.exp(-0.5 * (x / sigma).pow(2))
    return kernel / kernel.sum()


def _blur_axis(image: torch.Tensor, weights: list[float], dim: int) -> torch.Tensor:
    """One 1-D pass along ``dim`` (−1 rows, −2 columns) with reflect padding: a weighted sum of
    shifted slices (faster on one thread than a depthwise convolution for 9 taps)."""
    pad = len(weights) // 2
    length = image.shape[dim]
    padding = [pad, pad, 0, 0] if dim == -1 else [0, 0, pad, pad]
    padded = F.pad(image.unsqueeze(0), padding, mode="reflect").squeeze(0)
    out = padded.narrow(dim, 0, length) * weights[0]
    for shift in range(1, len(weights)):
        out.add_(padded.narrow(dim, shift, length), alpha=weights[shift])
    return out


def gaussian_blur(image: torch.Tensor, sigma: float, size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """The ``size``×``size`` Gaussian blur (reflect padding) as a row pass and a column pass."""
    weights = gaussian_kernel1d(sigma, size).tolist()
    return _blur_axis(_blur_axis(image, weights, -1), weights, -2)


def solarize_(image: torch.Tensor) -> torch.Tensor:
    """In place: values ≥ 128/255 become 1 − value (the uint8 solarize at threshold 128)."""
    threshold = SOLARIZE_THRESHOLD_UINT8 / 255.0 - 0.5 / 255.0  # the midpoint below 128/255
    return torch.where(image >= threshold, 1.0 - image, image, out=image)


def apply_pixel_ops(image: torch.Tensor, ops: PixelOps) -> torch.Tensor:
    """Colour jitter → grayscale → blur → solarize on a float [3, h, w] image in [0, 1]."""
    if ops.color_jitter is not None:
        image = apply_color_jitter(image, ops.color_jitter)
    if ops.grayscale:
        image = grayscale(image).expand(3, -1, -1).contiguous()
    if ops.blur_sigma is not None:
        image = gaussian_blur(image, ops.blur_sigma)
    if ops.solarize:
        image = solarize_(image)
    return image


class FastPixels:
    """The ``fast`` view pipeline's pixel stage (see the module docstring); the same interface as
    ``transforms.ReferencePixels``."""

    name = "fast"

    def resized_crop(self, image: torch.Tensor, box: CropBox, height: int, width: int) -> torch.Tensor:
        """The ``box`` of ``image`` [3, H, W] resized to height×width (bicubic, antialias): the same
        values as the reference's ``TF.resized_crop``, with a uint8 box made channels-last first
        (the layout of torch's fast uint8 kernel) and without torchvision's dispatch."""
        part = image[:, box.top : box.top + box.height, box.left : box.left + box.width].unsqueeze(0)
        if part.dtype == torch.uint8:
            part = part.contiguous(memory_format=torch.channels_last)
        if (box.height, box.width) == (height, width):
            return part.squeeze(0)
        resized = F.interpolate(
            part, size=(height, width), mode="bicubic", antialias=True, align_corners=False
        )
        return resized.squeeze(0)

    def to_float(self, crop: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] (any memory layout) → float32 [0, 1], contiguous."""
        return crop.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)

    def photometric(self, crop: torch.Tensor, ops: PixelOps) -> torch.Tensor:
        """uint8 crop → float32 [0, 1] after its photometric ops."""
        return apply_pixel_ops(self.to_float(crop), ops)

    def normalize(self, image: torch.Tensor, mean, std) -> torch.Tensor:
        """(image − mean) / std as one multiply-add (in place on ``image``)."""
        scale = torch.tensor([1.0 / float(s) for s in std]).view(3, 1, 1)
        shift = torch.tensor([-float(m) / float(s) for m, s in zip(mean, std)]).view(3, 1, 1)
        return image.mul_(scale).add_(shift)
