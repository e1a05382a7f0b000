"""Sinkhorn-Knopp: against the reference algorithm, balancing, extreme logits, and 2 gloo ranks."""

from __future__ import annotations

import torch

from dino_bridge.assign.sinkhorn import SinkhornKnopp, sinkhorn_knopp
from tests.distributed_utils import spawn


def reference_sinkhorn(logits, teacher_temp, n_iterations=3):
    """DINOv3's procedure as written (no max subtraction), in float64, single process."""
    q = torch.exp(logits.double() / teacher_temp).t()  # [K, N]
    n_prototypes, n_rows = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_rows
    q *= n_rows
    return q.t()


def biased_logits(n_rows, n_prototypes, seed=0, scale=1.0):
    """Random logits with a strong per-prototype bias, so a plain softmax is unbalanced."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.linspace(0.0, 3.0, n_prototypes)
    return (torch.randn(n_rows, n_prototypes, generator=gen) + bias) * scale


def test_rows_sum_to_one_and_dtype():
    logits = biased_logits(40, 12)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        probs = sinkhorn_knopp(logits.to(dtype), 0.1)
        assert probs.dtype == torch.float32 and probs.shape == (40, 12)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(40))
        assert (probs >= 0).all()


def test_matches_reference_on_moderate_logits():
    logits = biased_logits(48, 20, seed=1, scale=2.0)
    for teacher_temp in (0.07, 0.5):
        for n_iterations in (1, 3, 10):
            expected = reference_sinkhorn(logits, teacher_temp, n_iterations).float()
            probs = sinkhorn_knopp(logits, teacher_temp, n_iterations=n_iterations)
            torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)


def test_columns_approach_n_over_k():
    n_rows, n_prototypes, teacher_temp = 256, 16, 0.5
    logits = biased_logits(n_rows, n_prototypes, seed=2)
    target = n_rows / n_prototypes

    def imbalance(probs):
        return (probs.sum(dim=0) - target).abs().max().item()

    softmax_gap = imbalance(torch.softmax(logits / teacher_temp, dim=1))
    sk3_gap = imbalance(sinkhorn_knopp(logits, teacher_temp, n_iterations=3))
    sk50_gap = imbalance(sinkhorn_knopp(logits, teacher_temp, n_iterations=50))
    assert softmax_gap > 0.5 * target  # the bias makes the plain softmax far from balanced
    assert sk3_gap < 0.1 * softmax_gap
    assert sk50_gap < 1e-3 * target


def test_extreme_logits_stay_finite_and_exact():
    gen = torch.Generator().manual_seed(3)
    teacher_temp = 0.04
    logits = (torch.rand(64, 32, generator=gen) * 2 - 1) * 1000 * teacher_temp  # L/T in [-1000, 1000]
    assert torch.isinf(torch.exp(logits / teacher_temp)).any()  # the reference would overflow
    probs = sinkhorn_knopp(logits, teacher_temp)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(64))
    # A global shift leaves the procedure unchanged, and in float64 keeps the reference in range.
    expected = reference_sinkhorn(logits - logits.max(), teacher_temp).float()
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)


def test_sample_far_below_every_prototype_gets_a_distribution():
    # Row 0 is > 100 below the best sample of every prototype: a max-shifted exp underflows its
    # whole column to 0 (0/0 in the reference); in log space it gets its proper target.
    logits = biased_logits(16, 8, seed=4)
    logits[0] = logits.min() - 150.0 + torch.arange(8.0)
    probs = sinkhorn_knopp(logits, 1.0)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(16))
    assert probs[0].argmax().item() == 7


def test_module_is_stateless():
    assigner = SinkhornKnopp(n_iterations=4)
    logits = biased_logits(10, 6, seed=5)
    assert assigner.state_dict() == {}
    record = assigner.snapshot()
    first = assigner(logits, 0.2)
    assigner.restore(record)
    torch.testing.assert_close(first, sinkhorn_knopp(logits, 0.2, n_iterations=4))
    torch.testing.assert_close(assigner(logits, 0.2), first)
    assert assigner.diagnostics() == {}


def _sharded_worker(rank, world_size, cases, teacher_temp):
    return [sinkhorn_knopp(shards[rank], teacher_temp) for shards in cases]


def test_two_ranks_equal_one_rank_on_the_concatenation():
    logits = biased_logits(30, 10, seed=6, scale=3.0)
    teacher_temp = 0.07
    splits = [(15, 15), (4, 26), (0, 30)]  # equal, unequal, one rank without rows
    cases = [list(torch.split(logits, sizes)) for sizes in splits]
    per_rank = spawn(_sharded_worker, 2, cases, teacher_temp)
    expected = sinkhorn_knopp(logits, teacher_temp)
    for case_index, sizes in enumerate(splits):
        result = torch.cat([per_rank[rank][case_index] for rank in range(2)])
        assert [per_rank[rank][case_index].shape[0] for rank in range(2)] == list(sizes)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-7)
