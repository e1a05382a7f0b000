"""RoPE: periods, coordinates, table layout, augmentation, and the rotation itself."""

from __future__ import annotations

import math

import pytest
import torch

from dino_bridge.models.rope import RopePositionEmbedding, rope_apply, rotate_half


def _rope(embed_dim=128, num_heads=2, **kwargs):
    kwargs.setdefault("dtype", "fp32")
    rope = RopePositionEmbedding(embed_dim, num_heads, **kwargs)
    rope.init_weights()
    return rope.eval()


def test_base_periods_for_head_dim_64():
    periods = _rope(128, 2, base=100.0).periods  # D_h = 64 → 16 periods
    assert periods.shape == (16,)
    assert periods[0].item() == pytest.approx(1.0)
    assert periods[-1].item() == pytest.approx(74.99, abs=5e-3)
    ratios = periods[1:] / periods[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 100 ** (1 / 16)))


def test_min_max_periods_are_log_spaced():
    periods = _rope(64, 2, base=None, min_period=0.5, max_period=50.0).periods
    assert periods.shape == (8,)
    assert periods[0].item() == pytest.approx(0.5) and periods[-1].item() == pytest.approx(50.0)
    assert torch.allclose(periods.log().diff(), torch.full((7,), math.log(100) / 7))


@pytest.mark.parametrize(
    "kwargs",
    [dict(base=100.0, min_period=1.0, max_period=10.0), dict(base=None), dict(base=None, min_period=1.0)],
)
def test_period_parametrisation_needs_exactly_one_choice(kwargs):
    with pytest.raises(ValueError, match="exactly one"):
        RopePositionEmbedding(64, 2, **kwargs)


def test_bad_dims_and_names_are_rejected():
    with pytest.raises(ValueError, match="4\\*num_heads"):
        RopePositionEmbedding(48, 8)
    with pytest.raises(ValueError, match="separate"):
        RopePositionEmbedding(64, 2, normalize_coords="box")
    with pytest.raises(ValueError, match="bf16"):
        RopePositionEmbedding(64, 2, dtype="fp8")


def test_periods_buffer_builds_on_meta_and_is_persistent():
    with torch.device("meta"):
        rope = RopePositionEmbedding(64, 2)
    assert rope.periods.is_meta and rope.periods.dtype == torch.bfloat16
    assert "periods" in rope.state_dict()


def test_coords_are_patch_centres_in_minus_one_one():
    rope = _rope()
    coords = rope.coords(3, 5)
    assert coords.shape == (15, 2)
    assert torch.allclose(coords[::5, 0], torch.tensor([-2 / 3, 0.0, 2 / 3]))  # y varies slowest
    assert torch.allclose(coords[:5, 1], torch.tensor([-0.8, -0.4, 0.0, 0.4, 0.8]))
    for n in (16, 48):  # every resolution spans the same range
        c = rope.coords(n, n)
        assert c.min().item() == pytest.approx(-1 + 1 / n) and c.max().item() == pytest.approx(1 - 1 / n)
    wide = _rope(normalize_coords="max").coords(2, 4)
    assert torch.allclose(wide[:, 0].unique(), torch.tensor([-0.75, -0.25]))
    tall = _rope(normalize_coords="min").coords(2, 4)
    assert tall[:, 1].max().item() == pytest.approx(2.5)


def test_tables_are_y_angles_then_x_angles_tiled_twice():
    rope = _rope(64, 2)  # D_h = 32, F = 8
    sin, cos = rope(3, 4)
    assert sin.shape == cos.shape == (12, 32)
    coords, periods = rope.coords(3, 4), rope.periods
    angles_y = 2 * math.pi * coords[:, :1] / periods
    angles_x = 2 * math.pi * coords[:, 1:] / periods
    expected = torch.cat([angles_y, angles_x, angles_y, angles_x], dim=1)
    assert torch.allclose(sin, expected.sin(), atol=1e-6) and torch.allclose(cos, expected.cos(), atol=1e-6)


def test_tables_use_the_rope_dtype():
    rope = _rope(dtype="bf16")
    sin, cos = rope(2, 2)
    assert sin.dtype == cos.dtype == rope.periods.dtype == torch.bfloat16


def test_no_augmentation_in_eval_mode():
    rope = _rope(shift_coords=0.5, jitter_coords=2.0, rescale_coords=2.0)
    torch.manual_seed(0)
    a = rope(4, 4)
    b = rope(4, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_augmentation_in_training_mode():
    base = _rope().coords(4, 6)
    rescale = _rope(rescale_coords=2.0).train()
    ratio = rescale.coords(4, 6) / base
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))  # one factor shared by both axes
    assert 0.5 <= ratio[0, 0].item() <= 2.0
    jitter = _rope(jitter_coords=3.0).train()
    ratio = jitter.coords(4, 6) / base
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))  # one factor per axis
    assert ((ratio >= 1 / 3) & (ratio <= 3)).all()
    shift = _rope(shift_coords=0.25).train()
    delta = shift.coords(4, 6) - base
    assert torch.allclose(delta, delta[:1].expand_as(delta), atol=1e-6)
    assert (delta.abs() <= 0.25).all()
    sin_a, _ = rescale(4, 6)
    sin_b, _ = rescale(4, 6)
    assert not torch.equal(sin_a, sin_b)  # a fresh draw per call


def test_rotation_preserves_norms_and_rotates_pairs_d_and_d_plus_half():
    rope = _rope(64, 2)
    sin, cos = rope(3, 3)
    x = torch.randn(2, 2, 9, 32)
    y = rope_apply(x, sin, cos)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    half = 16
    # explicit 2×2 rotation of the pair (d, d + D_h/2) by the angle of column d
    angle = torch.atan2(sin[:, :half], cos[:, :half])
    x1, x2 = x[..., :half], x[..., half:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.equal(rotate_half(rotate_half(x)), -x)


def test_scores_depend_only_on_relative_position():
    rope = _rope(64, 2)
    sin, cos = rope(1, 8)  # one row: equally spaced x coordinates
    q = torch.randn(32).expand(1, 1, 8, 32)
    k = torch.randn(32).expand(1, 1, 8, 32)
    qr, kr = rope_apply(q, sin, cos)[0, 0], rope_apply(k, sin, cos)[0, 0]
    assert torch.allclose(qr[2] @ kr[5], qr[3] @ kr[6], atol=1e-4)
    assert not torch.allclose(qr[2] @ kr[5], qr[2] @ kr[6], atol=1e-4)


def test_rope_apply_computes_in_rope_dtype_and_returns_input_dtype():
    sin, cos = _rope(dtype="bf16")(2, 2)
    x = torch.randn(1, 2, 4, 64)
    y = rope_apply(x, sin, cos)
    assert y.dtype == torch.float32
    assert torch.equal(y, rope_apply(x.bfloat16(), sin, cos).float())
