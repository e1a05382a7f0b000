"""Pure DTCH math (dino_bridge.assign.dtch_math) against direct float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_bridge.assign.dtch_math import (
    balance_log_weights,
    balanced_targets_,
    boost_factors,
    soft_logits,
    window_block_rows,
    window_history,
)
from tests.assign.dtch_oracle import balance_weights


def test_soft_logits_scales_clamps_and_leaves_input_alone():
    z = torch.tensor([[3.0, -3.0, 0.5, 0.0]])
    z_before = z.clone()
    y = soft_logits(z, teacher_temp=0.05, temp_scale=2.0, logit_clamp=20.0)
    assert y.dtype == torch.float32 and y.data_ptr() != z.data_ptr()
    torch.testing.assert_close(y, torch.tensor([[20.0, -30.0, 5.0, 0.0]]))
    assert torch.equal(z, z_before)
    y16 = soft_logits(z.bfloat16(), teacher_temp=0.05, temp_scale=2.0, logit_clamp=20.0)
    assert y16.dtype == torch.float32
    torch.testing.assert_close(y16, y)


def test_window_history_is_an_fp64_sum():
    gen = torch.Generator().manual_seed(0)
    window = torch.rand(37, 11, generator=gen) * 10.0 ** torch.randint(-8, 8, (37, 11), generator=gen)
    h = window_history(window)
    assert h.dtype == torch.float64
    np.testing.assert_allclose(h.numpy(), window.double().numpy().sum(0), rtol=1e-14)
    assert window_history(window, torch.float32).dtype == torch.float32


@pytest.mark.parametrize(("capacity", "rows"), [(1, 1), (2, 2), (9, 3), (10, 4), (312, 18), (625, 25)])
def test_window_block_rows_is_ceil_sqrt(capacity, rows):
    assert window_block_rows(capacity) == rows


def _direct_boost(h, alpha, w_max, d, eps):
    mean = h.mean()
    return np.array(
        [min(max(abs(mean / (x + eps) - d) ** alpha, 1.0), w_max) if x < mean / d else 1.0 for x in h]
    )


@pytest.mark.parametrize(("alpha", "w_max", "d", "eps"), [(0.3, 50.0, 500.0, 1e-6), (0.5, 20.0, 100.0, 1e-3)])
def test_boost_factors_match_direct_formula(alpha, w_max, d, eps):
    gen = np.random.default_rng(1)
    h = np.concatenate([10.0 ** gen.uniform(-12, 6, 200), [0.0, 1e6, 1e6]])
    b, rare = boost_factors(torch.from_numpy(h), alpha=alpha, w_max=w_max, divisor=d, eps=eps)
    np.testing.assert_allclose(b.numpy(), _direct_boost(h, alpha, w_max, d, eps), rtol=1e-12)
    np.testing.assert_array_equal(rare.numpy(), h < h.mean() / d)


def test_boost_threshold_and_cap():
    # K = 8, Σh = 8000: mean 1000, rarity threshold mean/d = 2.
    h = torch.tensor([1.999, 1.0, 1e-9, 0.0], dtype=torch.float64)
    h = torch.cat([h, torch.full((4,), (8000.0 - h.sum().item()) / 4, dtype=torch.float64)])
    mean, d = h.mean().item(), 500.0
    assert mean == pytest.approx(1000.0)
    b, rare = boost_factors(h, alpha=0.3, w_max=50.0, divisor=d, eps=1e-6)
    assert rare[:4].all() and not rare[4:].any()
    assert b[0] == 1.0  # rare, but |mean/h - d|^0.3 = 0.25^0.3 < 1: clamped up to 1
    assert b[1] == pytest.approx((mean / (1.0 + 1e-6) - d) ** 0.3)
    assert b[2] == 50.0 and b[3] == 50.0  # capped at w_max
    assert (b[4:] == 1.0).all()


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.01, 2.0, 3.0, 0.0, -1.0])
def test_balance_weights_match_direct_formula_per_branch(beta):
    gen = np.random.default_rng(2)
    h = np.concatenate([10.0 ** gen.uniform(-9, 12, 300), [0.0, 1e-7, 1e-6]])
    log_w = balance_log_weights(torch.from_numpy(h), beta)
    assert log_w.dtype == torch.float64 and log_w.shape == h.shape
    direct = balance_weights(h, beta)
    np.testing.assert_allclose(np.exp(log_w.numpy()), direct, rtol=1e-12, atol=0)
    if beta == 3.0:
        assert (direct == 1e-25).any()  # the weight floor binds on this branch


def _literal_targets(e, b, log_w, gamma):
    """The formula of METHOD §3, in float64, through log-space softmax as the seed does."""
    e, b, w = e.astype(np.float64), b.astype(np.float64), np.exp(log_w.astype(np.float64))
    be = b * e
    p = be / np.maximum(be.sum(1, keepdims=True), 1e-25)
    logits = np.log(np.maximum(p, 1e-25)) + np.log(w)
    logits -= logits.max(1, keepdims=True)
    q = np.exp(logits)
    q /= q.sum(1, keepdims=True)
    if gamma != 1:
        q = q**gamma
        q /= np.maximum(q.sum(1, keepdims=True), 1e-25)
    return q


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.0])
def test_balanced_targets_match_literal_formula(gamma):
    gen = torch.Generator().manual_seed(3)
    n, k = 24, 300
    y = (torch.randn(n, k, generator=gen) * 25).clamp_(-30, 30)  # the P floor binds for many entries
    y[:, :5] = 30.0  # tied at the clamp
    e = y.exp()
    h = (10.0 ** (torch.rand(k, generator=gen, dtype=torch.float64) * 20 - 10)) * n
    b, _ = boost_factors(h, alpha=0.3, w_max=50.0, divisor=500.0, eps=1e-6)
    log_w = balance_log_weights(h, 1.0)
    expected = _literal_targets(e.numpy(), b.numpy(), log_w.numpy(), gamma)
    p = (b[None] * e.double()) / (b[None] * e.double()).sum(1, keepdim=True)
    assert (p < 1e-25).any(), "the test data must exercise the P floor"
    e_in = e.clone()
    q = balanced_targets_(e_in, b, log_w, gamma)
    assert q.data_ptr() == e_in.data_ptr() and q.dtype == torch.float32  # in place
    np.testing.assert_allclose(q.numpy(), expected, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(q.double().sum(1).numpy(), 1.0, atol=1e-6)


def test_balanced_targets_power_floor_binds_literally():
    # K^(1-γ) = 1000^-9 < 1e-25: for a uniform row Σq^γ = 1e-27, the 1e-25 floor binds, so the row
    # sums to 1e-2 (the literal formula; softmax(γ·log q) would return a uniform row).
    k, gamma = 1000, 10.0
    assert (gamma - 1) * math.log(k) > 25 * math.log(10)
    e = torch.ones(2, k)
    e[1, 0] = 1e6  # a peaked row: no floor
    q = balanced_targets_(e, torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), gamma)
    torch.testing.assert_close(q[0], torch.full((k,), 1e-30 / 1e-25), rtol=1e-4, atol=0)
    assert q[1].sum().item() == pytest.approx(1.0, abs=1e-6)
