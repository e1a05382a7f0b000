"""Model architectures: the DINOv3 ViT backbone, RoPE, blocks, heads and init helpers."""

from dino_bridge.models.block import Block, drop_path_subset_size
from dino_bridge.models.heads import DINOHead
from dino_bridge.models.layers import (
    FFN_LAYERS,
    NORM_LAYERS,
    LayerNorm,
    LayerScale,
    LinearKMaskedBias,
    Mlp,
    PatchEmbed,
    RMSNorm,
    SelfAttention,
    SwiGLUFFN,
    make_ffn,
    make_norm,
    swiglu_hidden_dim,
)
from dino_bridge.models.rope import RopePositionEmbedding, rope_apply
from dino_bridge.models.vit import ARCHS, DinoVisionTransformer, build_vit

__all__ = [
    "ARCHS",
    "FFN_LAYERS",
    "NORM_LAYERS",
    "Block",
    "DINOHead",
    "DinoVisionTransformer",
    "LayerNorm",
    "LayerScale",
    "LinearKMaskedBias",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "RopePositionEmbedding",
    "SelfAttention",
    "SwiGLUFFN",
    "build_vit",
    "drop_path_subset_size",
    "make_ffn",
    "make_norm",
    "rope_apply",
    "swiglu_hidden_dim",
]
