"""KoLeo: analytic configurations, a brute-force oracle, the gate, degenerate inputs, chunking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_bridge.losses import koleo_loss, koleo_loss_chunked


def per_row_oracle(x):
    """l_i by brute force in float64: nearest other row by Euclidean distance (unit vectors)."""
    feats = F.normalize(x.double(), dim=-1, eps=1e-8)
    terms = []
    for i in range(feats.shape[0]):
        others = [j for j in range(feats.shape[0]) if j != i]
        j = min(others, key=lambda j: (feats[i] - feats[j]).norm().item())
        terms.append(-math.log((feats[i] - feats[j] + 1e-8).norm().item() + 1e-8))
    return torch.tensor(terms, dtype=torch.float64)


def gated_oracle(terms, threshold, slope):
    gates = [1.0 / (1.0 + math.exp(-(t - threshold) / slope)) for t in terms.tolist()]
    weighted = [g * t for g, t in zip(gates, terms.tolist())]
    return 0.5 * sum(weighted) / len(weighted) + 0.5 * sum(weighted) / max(sum(gates), 1.0)


def test_two_antipodal_vectors():
    x = torch.tensor([[3.0, 0.0, 0.0], [-0.5, 0.0, 0.0]])  # norms do not matter
    assert koleo_loss(x).item() == pytest.approx(-math.log(2.0), abs=1e-6)


def test_regular_simplex():
    n = 5
    x = torch.eye(n) - 1.0 / n  # n unit-norm-after-normalisation vertices, pairwise dot -1/(n-1)
    expected = -math.log(math.sqrt(2.0 * n / (n - 1)))
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-6)


def test_points_on_a_circle():
    # Angles 0, 60, 150, 270 degrees: nearest chords 1, 1, sqrt(2), sqrt(2).
    angles = torch.tensor([0.0, 60.0, 150.0, 270.0]).deg2rad()
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert koleo_loss(x).item() == pytest.approx(-math.log(2.0) / 4, abs=1e-6)


def test_matches_brute_force_oracle():
    x = torch.randn(17, 6, generator=torch.Generator().manual_seed(0))
    terms = per_row_oracle(x)
    assert koleo_loss(x).item() == pytest.approx(terms.mean().item(), rel=1e-5)


@pytest.mark.parametrize("threshold", [0.0, -0.3, 0.5])
def test_gate_formula(threshold):
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    expected = gated_oracle(per_row_oracle(x), threshold, 0.1)
    loss = koleo_loss(x, gate=True, gate_threshold=threshold)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    expected_slope = gated_oracle(per_row_oracle(x), threshold, 0.5)
    loss_slope = koleo_loss(x, gate=True, gate_threshold=threshold, gate_slope=0.5)
    assert loss_slope.item() == pytest.approx(expected_slope, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("gate", [False, True])
def test_duplicate_rows_are_finite_with_finite_gradient(gate):
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [2.0, 4.0, 6.0]], requires_grad=True)
    loss = koleo_loss(x, gate=gate)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("n_rows", [0, 1])
def test_fewer_than_two_rows_is_zero_and_connected(n_rows):
    x = torch.randn(n_rows, 4, requires_grad=True)
    for gate in (False, True):
        loss = koleo_loss(x, gate=gate)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_fp32_under_autocast_and_low_precision_input():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    reference = koleo_loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = koleo_loss(x)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)
    assert koleo_loss(x.bfloat16()).dtype == torch.float32


def test_chunked_matches_per_chunk_loop_and_drops_remainder():
    x = torch.randn(23, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
    for gate in (False, True):
        loss = koleo_loss_chunked(x, 5, generator=torch.Generator().manual_seed(7), gate=gate)
        perm = torch.randperm(23, generator=torch.Generator().manual_seed(7))
        chunks = [x[perm[i * 5 : (i + 1) * 5]] for i in range(4)]  # 3 rows dropped
        expected = torch.stack([koleo_loss(c, gate=gate) for c in chunks]).mean()
        torch.testing.assert_close(loss, expected)
    loss.backward()
    dropped = perm[20:]
    assert torch.equal(x.grad[dropped], torch.zeros(3, 5))


def test_chunked_with_fewer_rows_than_chunk_is_one_chunk():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(koleo_loss_chunked(x, 128), koleo_loss(x))
    torch.testing.assert_close(koleo_loss_chunked(x, 7), koleo_loss(x))


def test_chunked_uses_global_rng_without_generator():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    first = koleo_loss_chunked(x, 8)
    torch.manual_seed(11)
    assert koleo_loss_chunked(x, 8).item() == first.item()


def test_errors():
    with pytest.raises(ValueError, match="chunk_size"):
        koleo_loss_chunked(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match="expected x"):
        koleo_loss(torch.randn(4))
