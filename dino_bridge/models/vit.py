"""The DINOv3 vision transformer backbone and its presets.

Shapes: B batch, C channels, H/W image height/width, p patch size, h = H/p, w = W/p,
hw = h·w patches, R storage (register) tokens, D width, N = 1 + R + hw tokens per image.

Token layout: [CLS, storage_1..storage_R, patch_1..patch_hw]. There is no absolute position
embedding: position comes only from RoPE, applied to the patch tokens inside attention.
Parameter names follow DINOv3 (``patch_embed.proj``, ``cls_token``, ``storage_tokens``,
``mask_token``, ``rope_embed.periods``, ``blocks.{i}.…``, ``norm``, ``cls_norm``,
``local_cls_norm``) so checkpoints and exports map 1:1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dino_bridge.models.block import Block
from dino_bridge.models.init import normal_, zeros_
from dino_bridge.models.layers import PatchEmbed, make_norm
from dino_bridge.models.rope import RopePositionEmbedding

__all__ = ["ARCHS", "DinoVisionTransformer", "build_vit"]

Masks = torch.Tensor | None


def _as_list(value: Any, n: int, name: str, is_item) -> list:
    """Broadcast a single item to n crop sets, or check that a list is aligned with them."""
    if is_item(value):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"`{name}` has {len(value)} entries but x has {n} crop sets")
    return value


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str | torch.dtype = "bf16",
    ):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(
                f"embed_dim must be divisible by 4*num_heads for 2-D RoPE; got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if n_storage_tokens < 0:
            raise ValueError(f"n_storage_tokens must be >= 0, got {n_storage_tokens}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_storage_tokens = n_storage_tokens
        self.n_prefix_tokens = 1 + n_storage_tokens

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim))
        else:
            self.storage_tokens = None
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim))
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads,
            base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            dtype=pos_embed_rope_dtype,
        )
        # The drop-path rate is the same for every block (DINOv3: no linear depth schedule).
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                ffn_ratio=ffn_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=drop_path_rate,
                layerscale_init=layerscale_init,
                norm_layer=norm_layer,
                ffn_layer=ffn_layer,
                mask_k_bias=mask_k_bias,
            )
            for _ in range(depth)
        )
        self.norm = make_norm(norm_layer, embed_dim)
        self.cls_norm = make_norm(norm_layer, embed_dim) if untie_cls_and_patch_norms else None
        self.local_cls_norm = make_norm(norm_layer, embed_dim) if untie_global_and_local_cls_norm else None

    # -----------------------------------------------------------------------------------------
    # Initialisation

    def init_weights(self) -> None:
        """Set every parameter and buffer explicitly (valid after building on ``meta``).

        The values are a pure function of torch's global seed and the module tree, whatever the
        device or the sharding (see ``dino_bridge.models.init``).
        """
        self.patch_embed.init_weights()
        normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            normal_(self.storage_tokens, std=0.02)
        zeros_(self.mask_token)
        self.rope_embed.init_weights()
        for block in self.blocks:
            block.init_weights()
        for norm in (self.norm, self.cls_norm, self.local_cls_norm):
            if norm is not None:
                norm.init_weights()

    # -----------------------------------------------------------------------------------------
    # Forward

    def prepare_tokens(self, x: torch.Tensor, masks: Masks = None) -> torch.Tensor:
        """[B, C, H, W] → [B, N, D]: patch embed, mask-token substitution, then the prefix tokens."""
        tokens = self.patch_embed(x)  # [B, hw, D]
        B, hw, _ = tokens.shape
        cls_token = self.cls_token
        if masks is not None:
            if masks.shape != (B, hw) or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be a bool tensor of shape [B, h*w] = [{B}, {hw}], got "
                    f"{masks.dtype} {tuple(masks.shape)}"
                )
            # Substituted before the prefix is prepended, so prefix tokens can never be masked.
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        else:
            # Keeps mask_token in the autograd graph when no crop set is masked (FSDP needs every
            # parameter to receive a gradient).
            cls_token = cls_token + 0 * self.mask_token
        prefix = [cls_token.expand(B, -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat([*(p.to(tokens.dtype) for p in prefix), tokens], dim=1)

    def _prefix_norm(self, local_crops: bool) -> nn.Module:
        """The final norm for [CLS + storage]: local_cls_norm (local crops, train only), else
        cls_norm when untied, else the shared norm."""
        if local_crops and self.training and self.local_cls_norm is not None:
            return self.local_cls_norm
        if self.cls_norm is not None:
            return self.cls_norm
        return self.norm

    def _outputs(self, x: torch.Tensor, masks: Masks, local_crops: bool) -> dict[str, torch.Tensor | None]:
        n_prefix = self.n_prefix_tokens
        prefix_norm = self._prefix_norm(local_crops)
        if prefix_norm is self.norm:
            x_norm = self.norm(x)
            prefix, patches = x_norm[:, :n_prefix], x_norm[:, n_prefix:]
        else:
            prefix, patches = prefix_norm(x[:, :n_prefix]), self.norm(x[:, n_prefix:])
        return {
            "x_norm_clstoken": prefix[:, 0],
            "x_storage_tokens": prefix[:, 1:],
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        masks: Masks | Sequence[Masks] = None,
        local_crops: bool | Sequence[bool] = False,
    ) -> dict[str, torch.Tensor | None] | list[dict[str, torch.Tensor | None]]:
        """Run the backbone on one crop set [B, C, H, W] or a list of crop sets of different sizes.

        ``masks``: None, a bool [B, hw] tensor, or a list aligned with ``x`` (entries may be None).
        ``local_crops``: a bool or a list of bools aligned with ``x``; in training mode the
        [CLS + storage] tokens of crop sets flagged True go through ``local_cls_norm`` (when it
        exists). The flag is explicit: the reference keyed this on "second list element".

        Returns per crop set a dict with ``x_norm_clstoken`` [B, D], ``x_storage_tokens`` [B, R, D],
        ``x_norm_patchtokens`` [B, hw, D], ``x_prenorm`` [B, N, D] and ``masks``; a list of dicts
        for list input, one dict for tensor input.
        """
        is_list = not isinstance(x, torch.Tensor)
        xs = list(x) if is_list else [x]
        if not xs:
            raise ValueError("forward_features got an empty list of crop sets")
        mask_list = _as_list(masks, len(xs), "masks", lambda m: m is None or isinstance(m, torch.Tensor))
        local_list = _as_list(local_crops, len(xs), "local_crops", lambda f: isinstance(f, bool))

        tokens = [self.prepare_tokens(xi, mi) for xi, mi in zip(xs, mask_list)]
        # Deliberate difference from the reference: the RoPE tables are computed ONCE per crop set
        # per forward and shared by all blocks, instead of once per block. With coordinate
        # augmentation this means one random draw per crop set per forward (the reference draws per
        # block), and it saves depth-1 recomputations of the tables.
        ropes = [self.rope_embed(*self.patch_embed.grid_size(xi.shape[-2], xi.shape[-1])) for xi in xs]
        for block in self.blocks:
            tokens = block(tokens, ropes)
        outputs = [self._outputs(t, m, loc) for t, m, loc in zip(tokens, mask_list, local_list)]
        return outputs if is_list else outputs[0]

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        """``n`` as sorted block indices: an int is the last n blocks, a sequence names blocks."""
        depth = len(self.blocks)
        if isinstance(n, bool) or not isinstance(n, (int, Sequence)):
            raise ValueError(f"n must be an int or a sequence of block indices, got {n!r}")
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n} blocks requested but the backbone has {depth} (1 <= n <= {depth})")
            return list(range(depth - n, depth))
        indices = list(n)
        if not indices:
            raise ValueError("n is an empty sequence of block indices")
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} are not in [0, {depth - 1}] (the backbone has {depth})")
        if len(set(indices)) != len(indices):
            raise ValueError(f"block indices {indices} repeat a block")
        return sorted(indices)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch-token outputs of chosen blocks (the DINOv2/DINOv3 probe API).

        ``n``: an int (the last n blocks) or a sequence of block indices in [0, depth); outputs come
        in increasing block order. ``norm``: apply the final norm(s) as ``forward_features`` does
        (the CLS through ``cls_norm`` when untied), so the last block with ``norm=True`` gives its
        ``x_norm_patchtokens`` / ``x_norm_clstoken``. Storage tokens are dropped.

        Returns a tuple with one entry per block: patch tokens [B, hw, D], or [B, D, h, w] with
        ``reshape``; each entry is a (patch tokens, CLS [B, D]) pair with ``return_class_token``.
        """
        if not isinstance(x, torch.Tensor):
            raise ValueError("get_intermediate_layers takes one image batch [B, C, H, W], not a list")
        wanted = self._block_indices(n)
        h, w = self.patch_embed.grid_size(x.shape[-2], x.shape[-1])
        tokens, rope = [self.prepare_tokens(x)], [self.rope_embed(h, w)]
        kept = []
        for index, block in enumerate(self.blocks[: wanted[-1] + 1]):  # later blocks are not needed
            tokens = block(tokens, rope)
            if index in wanted:
                kept.append(tokens[0])
        n_prefix = self.n_prefix_tokens
        results = []
        for out in kept:
            if norm:
                normed = self._outputs(out, None, local_crops=False)
                cls, patches = normed["x_norm_clstoken"], normed["x_norm_patchtokens"]
            else:
                cls, patches = out[:, 0], out[:, n_prefix:]
            if reshape:
                patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            results.append((patches, cls) if return_class_token else patches)
        return tuple(results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation feature: the final-normed CLS token, [B, C, H, W] → [B, D]."""
        return self.forward_features(x)["x_norm_clstoken"]


# DINOv3 arch functions (patch 16); kwargs of build_vit override these.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, ffn_ratio=4.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0),
    "vit_so400m": dict(embed_dim=1152, depth=27, num_heads=18, ffn_ratio=4304 / 1152),
    "vit_huge2": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=4.0),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_ratio=4.0),
    "vit_7b": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3.0),
}


def build_vit(arch: str, **kwargs: Any) -> DinoVisionTransformer:
    """Build a preset from ``ARCHS``; ``kwargs`` override the preset (e.g. ``ffn_ratio=6``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    return DinoVisionTransformer(**{**ARCHS[arch], **kwargs})
