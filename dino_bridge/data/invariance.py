"""The invariance sources of one image and the views built from them (METHOD §4).

Shapes: S = global crop size (a multiple of the patch size p), H×W the input image.

Two sources per image, both S×S:
- ``r``: the geometry (crop + flip) of global crop 1 or 2, chosen 50/50; with probability
  ``r_plain_probability`` no photometric op, otherwise a fresh draw of that crop's photometric
  pipeline (its blur and solarize probabilities, METHOD §2);
- ``o``: the whole image, 50/50 a squash resize to S×S or a short-side resize to S and a centre crop.

From each source x: ``raw_x`` (normalised source, the teacher's input), ``resizepaste_x`` (the
ResizePaste view, when requested) and a PatchRoll offset ``roll_x`` = (dr, dc); the rolled
``shift_x`` image is made on the device from ``raw_x`` (``views.roll_images``).

Each kind draws from its own generator, derived from (seed, rank, "views", kind, stream position)
by the dataset, so a view never depends on which other kinds are built, on the DataLoader worker
or on the number of workers. ``view_pipeline`` (``reference`` | ``fast``) picks the pixel stage
of ``transforms.pixel_pipeline``, as for the multi-crop views; the draws are the same for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino_bridge.data.transforms import (
    GLOBAL_BLUR_PROBABILITIES,
    GLOBAL_SOLARIZE_PROBABILITIES,
    MultiCropParams,
    pixel_pipeline,
    sample_pixel_ops,
)
from dino_bridge.data.views import resize_paste, sample_resize_paste, sample_roll

SOURCES = ("r", "o")


@dataclass(frozen=True)
class InvarianceSettings:
    """Plain values (the trainer fills them from ``resize_shuffle_augmentor``)."""

    size: int  # S, the global crop size
    patch_size: int
    rgb_mean: tuple[float, float, float]
    rgb_std: tuple[float, float, float]
    r_plain_probability: float = 0.3
    o_squash_probability: float = 0.5
    crop_probability: float = 0.7
    crop_scale: tuple[float, float] = (0.7, 1.0)
    paste_ratio: tuple[float, float] = (0.5, 0.9)
    keep_aspect_probability: float = 0.3
    max_roll: int = 5
    view_pipeline: str = "reference"

    def __post_init__(self) -> None:
        if self.size <= 0 or self.patch_size <= 0 or self.size % self.patch_size:
            raise ValueError(
                f"invariance views need a global crop size that is a multiple of the patch size, got "
                f"{self.size} and {self.patch_size}"
            )
        for name in (
            "r_plain_probability",
            "o_squash_probability",
            "crop_probability",
            "keep_aspect_probability",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class InvarianceViews:
    """``views(pixels, params, geometric_globals, generator_for, resize_paste=True)`` → a dict of
    ``raw_r``, ``raw_o`` [3, S, S] float32 (normalised), ``roll_r``, ``roll_o`` long [2] and, when
    ``resize_paste``, ``resizepaste_r``, ``resizepaste_o`` [3, S, S] float32."""

    def __init__(self, settings: InvarianceSettings) -> None:
        self.settings = settings
        self.pixels = pixel_pipeline(settings.view_pipeline)

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        """May work in place on ``image`` (the fast pipeline's does)."""
        return self.pixels.normalize(image, self.settings.rgb_mean, self.settings.rgb_std)

    def source_r(
        self, params: MultiCropParams, geometric_globals: Sequence[torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """float32 [3, S, S] in [0, 1]: one global crop's geometry with (usually) fresh photometric
        ops."""
        unit_pick, unit_plain = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        crop = 0 if unit_pick < 0.5 else 1
        _, ops = sample_pixel_ops(
            generator, GLOBAL_BLUR_PROBABILITIES[crop], GLOBAL_SOLARIZE_PROBABILITIES[crop]
        )
        if unit_plain < self.settings.r_plain_probability:
            return self.pixels.to_float(geometric_globals[crop])
        return self.pixels.photometric(geometric_globals[crop], ops)

    def source_o(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 [3, S, S]: the whole image, squashed or short-side resized and centre-cropped."""
        size = self.settings.size
        squash = (
            torch.rand(1, generator=generator, dtype=torch.float64).item()
            < self.settings.o_squash_probability
        )
        if tuple(pixels.shape[-2:]) == (size, size):
            return pixels
        bicubic = {"interpolation": InterpolationMode.BICUBIC, "antialias": True}
        if squash:
            return TF.resize(pixels, [size, size], **bicubic)
        return TF.center_crop(TF.resize(pixels, [size], **bicubic), [size, size])

    def __call__(
        self,
        pixels: torch.Tensor,
        params: MultiCropParams,
        geometric_globals: Sequence[torch.Tensor],
        generator_for: Callable[[str], torch.Generator],
        *,
        resize_paste_views: bool = True,
    ) -> dict[str, torch.Tensor]:
        s = self.settings
        sources = {
            "r": self.source_r(params, geometric_globals, generator_for("r")),
            "o": self.pixels.to_float(self.source_o(pixels, generator_for("o"))),
        }
        out: dict[str, torch.Tensor] = {}
        for name, image in sources.items():
            out[f"raw_{name}"] = image  # normalised last, below: the fast pipeline does it in place
            out[f"roll_{name}"] = sample_roll(s.max_roll, generator_for(f"roll_{name}"))
            if resize_paste_views:
                geometry = sample_resize_paste(
                    s.size,
                    s.patch_size,
                    generator_for(f"resizepaste_{name}"),
                    crop_probability=s.crop_probability,
                    crop_scale=s.crop_scale,
                    paste_ratio=s.paste_ratio,
                    keep_aspect_probability=s.keep_aspect_probability,
                )
                out[f"resizepaste_{name}"] = self._normalize(
                    resize_paste(image, geometry, self.pixels.resized_crop)
                )
            out[f"raw_{name}"] = self._normalize(image)  # last: it may normalise in place
        return out


def data_kinds_for(views) -> frozenset[str]:
    """What the data pipeline must build for these view kinds: ``raw`` for any invariance view
    (the shift images are rolled from it on the device), plus ``resizepaste`` for those views."""
    kinds: set[str] = set()
    for view in views:
        if view.startswith(("raw_", "shift_", "resizepaste_")):
            kinds.add("raw")
        if view.startswith("resizepaste_"):
            kinds.add("resizepaste")
    return frozenset(kinds)
