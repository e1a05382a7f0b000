"""ViT building blocks: patch embedding, norms, attention with RoPE, FFN variants, LayerScale.

Shapes: B batch, n tokens per image, D width, heads attention heads, D_h = D/heads head width,
hw patches, h' FFN inner width, T = Σ B_i·n_i tokens of several crop sets laid end to end.

Every module has an ``init_weights()`` that sets all of its parameters and buffers explicitly
(through ``dino_bridge.models.init``), so a model built on ``meta`` is fully defined after
``to_empty`` + ``init_weights``. Names of parameters follow DINOv3 so checkpoints map 1:1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dino_bridge.models.init import constant_, copy_, init_linear, ones_, uniform_, zeros_
from dino_bridge.models.rope import rope_apply

__all__ = [
    "FFN_LAYERS",
    "NORM_LAYERS",
    "LayerNorm",
    "LayerScale",
    "LinearKMaskedBias",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "SelfAttention",
    "SwiGLUFFN",
    "apply_tokenwise",
    "make_ffn",
    "make_norm",
    "swiglu_hidden_dim",
]

Rope = tuple[torch.Tensor, torch.Tensor]  # (sin, cos), each [hw, D_h]


def apply_tokenwise(
    fn: Callable[[torch.Tensor], torch.Tensor], xs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Apply a token-wise ``fn`` ([T, D] → [T, D']) to several [B_i, n_i, D] tensors in one call.

    The crop sets are laid end to end so that a Linear runs as one matmul over all of them (the
    DINOv3 efficiency trick); the math is the same as applying ``fn`` to each separately.
    """
    if len(xs) == 1:
        x = xs[0]
        return [fn(x.reshape(-1, x.shape[-1])).unflatten(0, x.shape[:2])]
    flat = fn(torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]))
    chunks = flat.split([x.shape[0] * x.shape[1] for x in xs])
    return [c.unflatten(0, x.shape[:2]) for c, x in zip(chunks, xs)]


# ---------------------------------------------------------------------------------------------
# Patch embedding


# On the CPU in bf16/fp16, PyTorch's fused (flash) attention kernel is slower than the plain math
# one, up to 7x with backward for short sequences (benchmarks/bench_attention.py); in fp32 the fused
# one is faster. Both compute the same softmax attention. The math kernel holds the n x n scores, so
# it is used up to this many tokens.
CPU_MATH_ATTENTION_MAX_TOKENS = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of ``[B, heads, n, d]`` tensors, with the faster kernel for the CPU."""
    if (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-2] <= CPU_MATH_ATTENTION_MAX_TOKENS
    ):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch: [B, C, H, W] → [B, hw, D], hw = (H/p)·(W/p)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def init_weights(self) -> None:
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size**2))
        uniform_(self.proj.weight, -bound, bound)
        uniform_(self.proj.bias, -bound, bound)

    def grid_size(self, H: int, W: int) -> tuple[int, int]:
        """(h, w) patch grid of an H×W image; a ValueError names a size that is not a multiple of p."""
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        return H // p, W // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid_size(x.shape[-2], x.shape[-1])
        return self.proj(x).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Norms


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with an explicit ``init_weights`` (weight 1, bias 0)."""

    def init_weights(self) -> None:
        ones_(self.weight)
        zeros_(self.bias)


class RMSNorm(nn.Module):
    """weight ⊙ x / sqrt(mean(x²) + eps), computed in fp32 and returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "layernorm": partial(LayerNorm, eps=1e-6),
    "layernormbf16": partial(LayerNorm, eps=1e-5),  # a plain LayerNorm; the name is historical
    "rmsnorm": partial(RMSNorm, eps=1e-5),
}


def make_norm(name: str, dim: int) -> nn.Module:
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm_layer {name!r}; valid: {sorted(NORM_LAYERS)}")
    return NORM_LAYERS[name](dim)


# ---------------------------------------------------------------------------------------------
# Attention


class LinearKMaskedBias(nn.Linear):
    """The fused qkv Linear whose bias is multiplied by ``bias_mask`` (1 on q and v, 0 on k).

    The K bias is softmax-invariant, so it is switched off while the parameter is kept for
    checkpoint compatibility. Without a bias there is no mask buffer (as in DINOv3's 7B).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3:
            raise ValueError(f"LinearKMaskedBias needs out_features divisible by 3, got {out_features}")
        if bias:
            self.register_buffer("bias_mask", torch.empty(out_features), persistent=True)

    def init_weights(self) -> None:
        init_linear(self)
        if self.bias is not None:
            third = self.out_features // 3
            mask = torch.ones(self.out_features)
            mask[third : 2 * third] = 0.0
            copy_(self.bias_mask, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention (SDPA, scale 1/sqrt(D_h)) with RoPE on the patch tokens only.

    The first n − hw tokens of each sequence (CLS + storage tokens) are not rotated.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        linear_cls = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear_cls(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def init_weights(self) -> None:
        if isinstance(self.qkv, LinearKMaskedBias):
            self.qkv.init_weights()
        else:
            init_linear(self.qkv)
        init_linear(self.proj)

    def attend(self, qkv: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        """qkv [B, n, 3D] → attention output before ``proj``, [B, n, D]."""
        B, n, _ = qkv.shape
        q, k, v = qkv.view(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, n, D_h]
        if rope is not None:
            sin, cos = rope
            n_prefix = n - sin.shape[0]
            assert n_prefix >= 0, (n, sin.shape)
            q = torch.cat([q[:, :, :n_prefix], rope_apply(q[:, :, n_prefix:], sin, cos)], dim=2)
            k = torch.cat([k[:, :, :n_prefix], rope_apply(k[:, :, n_prefix:], sin, cos)], dim=2)
        out = attention(q, k, v)
        return out.transpose(1, 2).reshape(B, n, -1)

    def forward_list(self, xs: Sequence[torch.Tensor], ropes: Sequence[Rope | None]) -> list[torch.Tensor]:
        """Attention over several crop sets: qkv and proj run once on all tokens, SDPA per set."""
        qkvs = apply_tokenwise(self.qkv, xs)
        outs = [self.attend(qkv, rope) for qkv, rope in zip(qkvs, ropes)]
        return apply_tokenwise(self.proj, outs)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """x [B, n, D] → [B, n, D]; ``rope`` = (sin, cos) for the last hw tokens."""
        return self.forward_list([x], [rope])[0]


# ---------------------------------------------------------------------------------------------
# FFN


class Mlp(nn.Module):
    """fc1 → exact (erf) GELU → fc2."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def init_weights(self) -> None:
        init_linear(self.fc1)
        init_linear(self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden_dim(hidden_features: int, align_to: int) -> int:
    """h' = int(hidden·2/3) rounded UP to a multiple of ``align_to``."""
    inner = int(hidden_features * 2 / 3)
    return align_to * math.ceil(inner / align_to)


class SwiGLUFFN(nn.Module):
    """out = w3(silu(w1 x) ⊙ w2 x), with w1, w2: D → h' and w3: h' → D."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, align_to: int = 8):
        super().__init__()
        inner = swiglu_hidden_dim(hidden_features, align_to)
        self.w1 = nn.Linear(in_features, inner, bias=bias)
        self.w2 = nn.Linear(in_features, inner, bias=bias)
        self.w3 = nn.Linear(inner, in_features, bias=bias)

    def init_weights(self) -> None:
        for linear in (self.w1, self.w2, self.w3):
            init_linear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "swiglu": partial(SwiGLUFFN, align_to=8),
    "swiglu32": partial(SwiGLUFFN, align_to=32),
    "swiglu64": partial(SwiGLUFFN, align_to=64),
    "swiglu128": partial(SwiGLUFFN, align_to=128),
}


def make_ffn(name: str, dim: int, hidden_features: int, bias: bool = True) -> nn.Module:
    if name not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {name!r}; valid: {sorted(FFN_LAYERS)}")
    return FFN_LAYERS[name](dim, hidden_features, bias=bias)


# ---------------------------------------------------------------------------------------------
# LayerScale


class LayerScale(nn.Module):
    """x ⊙ gamma, gamma [D] initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        constant_(self.gamma, float(self.init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
