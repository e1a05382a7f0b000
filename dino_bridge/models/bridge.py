"""The Patch-to-CLS bridge: an inverse patch embedding from the patch grid to one vector (METHOD §5).

Shapes: B images, R×C = P patch grid, D backbone width, h hidden width (default D/2).

    tokens [B, P, D] → grid [B, D, R, C] → conv3×3 (D→h) → GELU → conv3×3 (h→h) → GELU
                     → conv R×C (h→D, no padding: the whole grid to 1×1) → [B, D] → LayerNorm

The first two convs start truncated-normal(0.02) with zero bias, the last one at zero, so the
output is exactly 0 (then the LayerNorm's bias, 0) at step 0. The grid comes from the crop size
and the patch size (the reference hard-coded 14×14). The last conv sees absolute grid positions;
for rolled inputs it has to learn the roll invariance.
"""

from __future__ import annotations

import torch
from torch import nn

from dino_bridge.models.init import trunc_normal_, zeros_
from dino_bridge.models.layers import LayerNorm

__all__ = ["InversePatchEmbed"]


class InversePatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, grid_size: tuple[int, int], hidden_dim: int | None = None):
        super().__init__()
        grid_h, grid_w = (int(v) for v in grid_size)
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"the bridge needs a patch grid of at least 1×1, got {grid_size}")
        hidden = embed_dim // 2 if hidden_dim is None else int(hidden_dim)
        if hidden < 1:
            raise ValueError(f"the bridge's hidden width must be >= 1, got {hidden}")
        self.grid_size = (grid_h, grid_w)
        self.conv1 = nn.Conv2d(embed_dim, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(hidden, embed_dim, kernel_size=(grid_h, grid_w))
        self.act = nn.GELU()
        self.norm = LayerNorm(embed_dim, eps=1e-6)

    def init_weights(self) -> None:
        for conv in (self.conv1, self.conv2):
            trunc_normal_(conv.weight, std=0.02)
            zeros_(conv.bias)
        zeros_(self.conv3.weight)
        zeros_(self.conv3.bias)
        self.norm.init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, P, D] (row-major grid order) → [B, D]."""
        grid_h, grid_w = self.grid_size
        b, num_patches, dim = tokens.shape
        if num_patches != grid_h * grid_w:
            raise ValueError(
                f"the bridge expects {grid_h}×{grid_w} = {grid_h * grid_w} patches, got {num_patches}"
            )
        grid = tokens.transpose(1, 2).reshape(b, dim, grid_h, grid_w)
        x = self.act(self.conv2(self.act(self.conv1(grid))))
        return self.norm(self.conv3(x).flatten(1))
