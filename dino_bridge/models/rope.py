"""Axial 2-D rotary position embedding (DINOv3 RoPE), with no learned weights.

Shapes: B batch, heads attention heads, n tokens, H/W patch-grid height/width, D_h head width,
F = D_h/4 frequencies per axis.

For a patch at grid cell (i, j) the coordinates are the patch centre normalised to [-1, 1]:
    y = 2·(i + 0.5)/H_norm − 1,   x = 2·(j + 0.5)/W_norm − 1
with (H_norm, W_norm) = (H, W) for "separate", (max(H,W),)*2 for "max", (min(H,W),)*2 for "min".
Angles are 2π·coord/period_f, laid out [y-angles (F) | x-angles (F)] and tiled twice to D_h
("rotate-half" layout: dimension d is paired with d + D_h/2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dino_bridge.models.init import copy_

__all__ = ["ROPE_DTYPES", "RopePositionEmbedding", "resolve_rope_dtype", "rope_apply", "rotate_half"]

ROPE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
NORMALIZE_COORDS = ("separate", "max", "min")


def resolve_rope_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ROPE_DTYPES:
        raise ValueError(f"unknown RoPE dtype {dtype!r}; valid: {sorted(ROPE_DTYPES)} or a torch.dtype")
    return ROPE_DTYPES[dtype]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] → [−x2, x1] over the last dim (halves of D_h)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate q or k: x·cos + rotate_half(x)·sin, computed in the dtype of ``sin``/``cos``.

    x: [B, heads, n, D_h]; sin, cos: [n, D_h]. Returns [B, heads, n, D_h] in x's dtype.
    """
    x_dtype = x.dtype
    x = x.to(sin.dtype)
    return (x * cos + rotate_half(x) * sin).to(x_dtype)


def _log_uniform(bound: float, size: int) -> list[float]:
    """``size`` factors log-uniform in [1/bound, bound], from torch's global CPU RNG."""
    log_bound = math.log(bound)
    return torch.empty(size).uniform_(-log_bound, log_bound).exp().tolist()


class RopePositionEmbedding(nn.Module):
    """Produces the (sin, cos) tables [H·W, D_h] for an H×W patch grid.

    Periods: either ``base`` (period_f = base^(f/F), f = 0..F−1) or ``min_period`` and
    ``max_period`` (F log-spaced periods from min to max); exactly one of the two.

    Training-mode-only coordinate augmentation (one draw per call, from torch's global RNG):
    ``shift_coords`` s adds U(−s, s) per axis; ``jitter_coords`` j multiplies each axis by its own
    log-uniform factor in [1/j, j]; ``rescale_coords`` r multiplies both axes by one shared
    log-uniform factor in [1/r, r]. In eval mode the tables are deterministic.

    ``dtype`` is the dtype of the ``periods`` buffer and of the returned tables (the rotation runs
    in it). The angles and their sin/cos are computed in fp32 and cast at the end, which is more
    accurate than the reference's trig in bf16 and identical to it for fp32.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: str | torch.dtype = "bf16",
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(
                "RoPE needs embed_dim divisible by 4*num_heads; "
                f"got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        has_base = base is not None
        has_any_range = min_period is not None or max_period is not None
        has_full_range = min_period is not None and max_period is not None
        if has_base == has_any_range or (has_any_range and not has_full_range):
            raise ValueError(
                "RoPE periods: give exactly one of `base` or (`min_period` and `max_period`); got "
                f"base={base}, min_period={min_period}, max_period={max_period}"
            )
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(
                f"unknown normalize_coords {normalize_coords!r}; valid: {list(NORMALIZE_COORDS)}"
            )
        self.head_dim = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = resolve_rope_dtype(dtype)
        # Filled by init_weights() so the module can be built on the meta device.
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=self.dtype), persistent=True)

    def compute_periods(self) -> torch.Tensor:
        """The F periods in fp64 on the CPU."""
        num_freqs = self.head_dim // 4
        if self.base is not None:
            return self.base ** (torch.arange(num_freqs, dtype=torch.float64) / num_freqs)
        ratio = self.max_period / self.min_period
        return self.min_period * ratio ** torch.linspace(0.0, 1.0, num_freqs, dtype=torch.float64)

    def init_weights(self) -> None:
        copy_(self.periods, self.compute_periods())

    def coords(self, H: int, W: int) -> torch.Tensor:
        """Patch-centre coordinates [H·W, 2] as (y, x), in [-1, 1] before augmentation (fp32)."""
        device = self.periods.device
        if self.normalize_coords == "separate":
            h_norm, w_norm = H, W
        elif self.normalize_coords == "max":
            h_norm = w_norm = max(H, W)
        else:
            h_norm = w_norm = min(H, W)
        ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / h_norm
        xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / w_norm
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # [H·W, 2]
        coords = 2.0 * grid - 1.0
        if self.training:
            coords = self._augment(coords)
        return coords

    def _augment(self, coords: torch.Tensor) -> torch.Tensor:
        # Draws are tiny CPU tensors turned into Python floats: no device sync, device-independent.
        if self.shift_coords:
            shift = torch.empty(2).uniform_(-self.shift_coords, self.shift_coords).tolist()
            coords = coords + coords.new_tensor(shift)
        if self.jitter_coords:
            coords = coords * coords.new_tensor(_log_uniform(self.jitter_coords, 2))
        if self.rescale_coords:
            coords = coords * _log_uniform(self.rescale_coords, 1)[0]
        return coords

    def forward(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each [H·W, D_h] in the RoPE dtype."""
        coords = self.coords(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # [H·W, 2, F]
        angles = angles.flatten(1, 2).tile(2)  # [H·W, D_h]: y-angles, x-angles, repeated
        return angles.sin().to(self.dtype), angles.cos().to(self.dtype)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base}, min_period={self.min_period}, "
            f"max_period={self.max_period}, normalize_coords={self.normalize_coords}, "
            f"shift={self.shift_coords}, jitter={self.jitter_coords}, rescale={self.rescale_coords}, "
            f"dtype={self.dtype}"
        )
