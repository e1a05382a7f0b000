"""The pre-norm transformer block with DINOv3's batch-subset drop path.

Shapes: B batch (b for one crop set), n tokens, D width, hw patches.

    x ← x + ls1(attn(norm1(x)))
    x ← x + ls2(ffn(norm2(x)))

Drop path (training mode, rate p > 0): for each residual branch separately and each crop set
separately, a random subset of s = max(⌊b·(1−p)⌋, 1) rows computes the branch, and the result is
added back to those rows scaled by b/s (unbiased in expectation; the other rows skip the branch).
This is the DINOv2/v3 "batch-subset residual dropping", not per-sample Bernoulli masking; it also
saves the compute of the dropped rows.

A block takes a LIST of crop sets (each [b_i, n_i, D] with its own RoPE tables), so that a block
sharded by FSDP is gathered once per forward for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dino_bridge.models.layers import (
    LayerScale,
    Rope,
    SelfAttention,
    apply_tokenwise,
    make_ffn,
    make_norm,
)

__all__ = ["Block", "drop_path_subset_size"]


def drop_path_subset_size(batch_size: int, rate: float) -> int:
    """s = max(⌊b·(1−p)⌋, 1): rows that compute a residual branch under drop path."""
    return max(int(batch_size * (1.0 - rate)), 1)


def _init(module: nn.Module) -> None:
    if not isinstance(module, nn.Identity):
        module.init_weights()


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        layerscale_init: float | None = 1e-5,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        mask_k_bias: bool = False,
    ):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {drop_path}")
        self.drop_path = drop_path
        self.norm1 = make_norm(norm_layer, dim)
        self.attn = SelfAttention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias
        )
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = make_norm(norm_layer, dim)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * ffn_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()

    def init_weights(self) -> None:
        for module in (self.norm1, self.attn, self.ls1, self.norm2, self.mlp, self.ls2):
            _init(module)

    def attn_branch(self, xs: Sequence[torch.Tensor], ropes: Sequence[Rope | None]) -> list[torch.Tensor]:
        """ls1(attn(norm1(x))) for every crop set."""
        outs = self.attn.forward_list(apply_tokenwise(self.norm1, xs), ropes)
        return [self.ls1(o) for o in outs]

    def ffn_branch(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """ls2(ffn(norm2(x))) for every crop set (token-wise, so one call over all sets)."""
        return apply_tokenwise(lambda t: self.ls2(self.mlp(self.norm2(t))), xs)

    def _residual(
        self, xs: Sequence[torch.Tensor], branch: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        if not (self.training and self.drop_path > 0.0):
            return [x + y for x, y in zip(xs, branch(list(xs)))]
        keep = [
            torch.randperm(x.shape[0], device=x.device)[: drop_path_subset_size(x.shape[0], self.drop_path)]
            for x in xs
        ]
        outs = branch([x[k] for x, k in zip(xs, keep)])
        return [
            torch.index_add(x, 0, k, y.to(x.dtype), alpha=x.shape[0] / k.numel())
            for x, k, y in zip(xs, keep, outs)
        ]

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        rope: Rope | None | Sequence[Rope | None] = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """A tensor [B, n, D] with ``rope`` = (sin, cos) or None; or a list of crop sets with a list
        of ropes aligned with it. Returns the same structure."""
        if isinstance(x, torch.Tensor):
            return self.forward([x], [rope])[0]
        ropes = list(rope) if rope is not None else [None] * len(x)
        assert len(ropes) == len(x), (len(ropes), len(x))
        assert all(r is None or (isinstance(r, (tuple, list)) and len(r) == 2) for r in ropes), (
            "one (sin, cos) pair or None per crop set"
        )
        xs = self._residual(x, lambda sub: self.attn_branch(sub, ropes))
        return self._residual(xs, self.ffn_branch)
