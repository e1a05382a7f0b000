"""Layers and the block: attention oracle, k-bias masking, FFN widths, norms, drop path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_bridge.models import (
    Block,
    LinearKMaskedBias,
    Mlp,
    RMSNorm,
    SelfAttention,
    drop_path_subset_size,
    make_ffn,
    make_norm,
    swiglu_hidden_dim,
)
from dino_bridge.models.rope import RopePositionEmbedding


def _init(module, seed=0):
    torch.manual_seed(seed)
    module.init_weights()
    return module


def _rope_tables(dim, heads, H, W, seed=0):
    rope = RopePositionEmbedding(dim, heads, dtype="fp32")
    rope.init_weights()
    return rope.eval()(H, W)


def _oracle_attention(attn, x, sin, cos, n_prefix):
    """Plain per-head softmax attention with an explicit pair rotation of the patch tokens."""
    B, n, D = x.shape
    heads = attn.num_heads
    d_h = D // heads
    q, k, v = attn.qkv(x).split(D, dim=-1)

    def heads_of(t):
        return t.view(B, n, heads, d_h).transpose(1, 2)

    q, k, v = heads_of(q), heads_of(k), heads_of(v)
    half = d_h // 2
    angle = torch.atan2(sin[:, :half], cos[:, :half])  # [hw, D_h/2]

    def rotate(t):
        out = t.clone()
        a, b = t[:, :, n_prefix:, :half], t[:, :, n_prefix:, half:]
        out[:, :, n_prefix:, :half] = a * angle.cos() - b * angle.sin()
        out[:, :, n_prefix:, half:] = b * angle.cos() + a * angle.sin()
        return out

    q, k = rotate(q), rotate(k)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d_h), dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, n, D))


def test_attention_matches_oracle_with_unrotated_prefix():
    attn = _init(SelfAttention(32, 2))
    sin, cos = _rope_tables(32, 2, 2, 3)
    x = torch.randn(2, 3 + 6, 32)  # 3 prefix tokens, 6 patches
    out = attn(x, (sin, cos))
    assert torch.allclose(out, _oracle_attention(attn, x, sin, cos, n_prefix=3), atol=1e-5)
    # rotating the prefix tokens too would be a different function
    wrong = _oracle_attention(attn, x, torch.cat([sin[:3], sin]), torch.cat([cos[:3], cos]), n_prefix=0)
    assert not torch.allclose(out, wrong, atol=1e-4)


def test_attention_without_rope_is_plain_sdpa():
    attn = _init(SelfAttention(32, 4))
    x = torch.randn(2, 5, 32)
    empty = torch.empty(0, 8)
    assert torch.allclose(attn(x), _oracle_attention(attn, x, empty, empty, n_prefix=5), atol=1e-5)


def test_k_bias_is_masked():
    D = 16
    qkv = _init(LinearKMaskedBias(D, 3 * D))
    assert torch.equal(qkv.bias_mask, torch.tensor([1.0] * D + [0.0] * D + [1.0] * D))
    with torch.no_grad():
        qkv.bias.normal_()
    x = torch.randn(4, D)
    out = qkv(x)
    plain = x @ qkv.weight.T
    assert torch.allclose(out[:, D : 2 * D], plain[:, D : 2 * D])  # k: no bias
    assert torch.allclose(out[:, :D], plain[:, :D] + qkv.bias[:D])  # q: biased
    assert torch.allclose(out[:, 2 * D :], plain[:, 2 * D :] + qkv.bias[2 * D :])  # v: biased
    # changing the k slice of the bias changes nothing; the gradient into it is zero
    with torch.no_grad():
        qkv.bias[D : 2 * D] += 5.0
    assert torch.equal(qkv(x), out)
    qkv(x).sum().backward()
    assert torch.all(qkv.bias.grad[D : 2 * D] == 0)
    # no bias → no mask buffer (DINOv3 7B: qkv_bias False with mask_k_bias)
    assert "bias_mask" not in LinearKMaskedBias(D, 3 * D, bias=False).state_dict()


def test_attention_uses_masked_linear_only_when_asked():
    assert isinstance(SelfAttention(32, 2, mask_k_bias=True).qkv, LinearKMaskedBias)
    assert not isinstance(SelfAttention(32, 2).qkv, LinearKMaskedBias)


@pytest.mark.parametrize(
    "name, dim, ratio, expected",
    [
        ("swiglu64", 1024, 4.0, 2752),  # int(4096·2/3) = 2730 → 2752
        ("swiglu64", 4096, 3.0, 8192),  # 7B
        ("swiglu", 384, 6.0, 1536),  # ViT-S+
        ("swiglu", 1280, 6.0, 5120),  # ViT-H+
        ("swiglu", 1024, 4.0, 2736),
        ("swiglu128", 1024, 4.0, 2816),
    ],
)
def test_swiglu_hidden_widths(name, dim, ratio, expected):
    with torch.device("meta"):
        ffn = make_ffn(name, dim, int(dim * ratio))
    assert ffn.w1.out_features == ffn.w2.out_features == ffn.w3.in_features == expected
    assert ffn.w3.out_features == dim


def test_swiglu_and_mlp_formulas():
    x = torch.randn(3, 16)
    swiglu = _init(make_ffn("swiglu", 16, 64))
    assert swiglu_hidden_dim(64, 8) == 48
    expected = swiglu.w3(F.silu(swiglu.w1(x)) * swiglu.w2(x))
    assert torch.allclose(swiglu(x), expected)
    mlp = _init(Mlp(16, 64))
    h = mlp.fc1(x)
    assert torch.allclose(mlp(x), mlp.fc2(0.5 * h * (1 + torch.erf(h / math.sqrt(2)))), atol=1e-6)


def test_norm_factory():
    assert make_norm("layernorm", 8).eps == 1e-6
    assert make_norm("layernormbf16", 8).eps == 1e-5
    rms = _init(make_norm("rmsnorm", 8))
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-5
    x = torch.randn(4, 8)
    assert torch.allclose(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert rms(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="layernorm.*rmsnorm"):
        make_norm("batchnorm", 8)
    with pytest.raises(ValueError, match="mlp.*swiglu"):
        make_ffn("moe", 8, 32)


def test_layerscale_init_and_identity_when_disabled():
    block = _init(Block(32, 2, layerscale_init=1e-3))
    assert torch.all(block.ls1.gamma == 1e-3) and torch.all(block.ls2.gamma == 1e-3)
    plain = _init(Block(32, 2, layerscale_init=None))
    assert isinstance(plain.ls1, torch.nn.Identity)
    assert not any("gamma" in name for name in plain.state_dict())


def test_block_on_a_list_equals_block_on_each_crop_set():
    block = _init(Block(32, 2, ffn_layer="swiglu")).eval()
    x1, x2 = torch.randn(3, 1 + 4, 32), torch.randn(2, 1 + 6, 32)
    r1, r2 = _rope_tables(32, 2, 2, 2), _rope_tables(32, 2, 2, 3)
    y1, y2 = block([x1, x2], [r1, r2])
    assert torch.allclose(y1, block(x1, r1), atol=1e-6)
    assert torch.allclose(y2, block(x2, r2), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Drop path


def test_subset_sizes_from_the_reference():
    assert drop_path_subset_size(128, 0.3) == 89
    assert drop_path_subset_size(32, 0.4) == 19
    assert drop_path_subset_size(2, 0.9) == 1


def test_drop_path_adds_the_branch_to_a_subset_scaled_by_b_over_subset():
    block = Block(8, 2, drop_path=0.5).train()
    seen = []

    def ones_branch(sub):
        seen.append([t.shape[0] for t in sub])
        return [torch.ones_like(t) for t in sub]

    xs = [torch.zeros(10, 3, 8), torch.zeros(5, 3, 8)]
    out = block._residual(xs, ones_branch)
    assert seen == [[5, 2]]  # own subset per crop set: ⌊10·0.5⌋, ⌊5·0.5⌋
    for y, b, s in zip(out, (10, 5), (5, 2)):
        rows = y[:, 0, 0]
        assert int((rows != 0).sum()) == s
        assert torch.allclose(rows[rows != 0], torch.full((s,), b / s))
        assert rows.sum().item() == pytest.approx(b)  # unbiased: Σ rows = b·branch

    out_eval = block.eval()._residual(xs, ones_branch)
    assert all(torch.equal(y, torch.ones_like(y)) for y in out_eval)  # eval: every row, unscaled


def test_block_drop_path_is_random_in_train_and_deterministic_in_eval():
    block = _init(Block(16, 2, drop_path=0.5, layerscale_init=1.0))
    x = torch.randn(8, 5, 16)
    block.train()
    torch.manual_seed(0)
    a = block(x)
    torch.manual_seed(1)
    b = block(x)
    assert not torch.allclose(a, b)
    block.eval()
    assert torch.equal(block(x), block(x))
    no_drop = _init(Block(16, 2, drop_path=0.0, layerscale_init=1.0))
    assert torch.equal(no_drop.train()(x), no_drop.eval()(x))


def test_bad_drop_path_rate():
    with pytest.raises(ValueError, match="drop_path"):
        Block(16, 2, drop_path=1.0)


def test_cpu_attention_kernel_choice_computes_softmax_attention():
    from dino_bridge.models.layers import CPU_MATH_ATTENTION_MAX_TOKENS, attention

    torch.manual_seed(0)
    for n in (5, CPU_MATH_ATTENTION_MAX_TOKENS, CPU_MATH_ATTENTION_MAX_TOKENS + 3):  # both kernels
        q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for _ in range(3))
        expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
        torch.testing.assert_close(attention(q, k, v), expected)
        qb, kb, vb = (t.float().requires_grad_() for t in (q, k, v))
        attention(qb, kb, vb).sum().backward()
        assert qb.grad is not None and torch.isfinite(qb.grad).all()
        # bf16 (the math kernel on the CPU up to the limit) agrees with fp32 to bf16 precision
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)
