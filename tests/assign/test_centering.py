"""Softmax centering: the formulas, the DINO update order, snapshot/restore, and 2 gloo ranks."""

from __future__ import annotations

import torch

from dino_bridge.assign.centering import SoftmaxCentering, centered_softmax, ema_center
from tests.distributed_utils import spawn


def random_logits(n_rows, n_prototypes=6, seed=0):
    return torch.randn(n_rows, n_prototypes, generator=torch.Generator().manual_seed(seed)) * 2


def test_centered_softmax_formula():
    logits = random_logits(5)
    center = torch.randn(1, 6, generator=torch.Generator().manual_seed(1))
    probs = centered_softmax(logits.bfloat16(), center, 0.04)
    assert probs.dtype == torch.float32
    expected = torch.softmax((logits.bfloat16().float() - center) / 0.04, dim=-1)
    torch.testing.assert_close(probs, expected)


def test_ema_center_formula():
    logits = random_logits(7)
    center = torch.randn(1, 6, generator=torch.Generator().manual_seed(2))
    expected = 0.9 * center + 0.1 * logits.mean(dim=0, keepdim=True)
    torch.testing.assert_close(ema_center(center, logits, 0.9), expected)
    # No rows anywhere: the centre stays.
    torch.testing.assert_close(ema_center(center, torch.zeros(0, 6), 0.9), center)


def test_probs_use_the_old_center_then_update():
    assigner = SoftmaxCentering(6, momentum=0.8)
    first, second = random_logits(4, seed=3), random_logits(9, seed=4)
    probs = assigner(first, 0.1)
    torch.testing.assert_close(probs, torch.softmax(first / 0.1, dim=-1))  # zero centre at init
    center_after_first = 0.2 * first.mean(dim=0, keepdim=True)
    torch.testing.assert_close(assigner.center, center_after_first)
    probs = assigner(second, 0.1)
    torch.testing.assert_close(probs, torch.softmax((second - center_after_first) / 0.1, dim=-1))
    torch.testing.assert_close(
        assigner.center, 0.8 * center_after_first + 0.2 * second.mean(dim=0, keepdim=True)
    )
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(9))


def test_snapshot_restore_and_state_dict():
    assigner = SoftmaxCentering(6)
    assigner(random_logits(5, seed=5), 0.1)
    record = assigner.snapshot()
    saved = assigner.center.clone()
    after = assigner(random_logits(5, seed=6), 0.1)
    assert not torch.equal(assigner.center, saved)
    assigner.restore(record)
    assert torch.equal(assigner.center, saved)
    torch.testing.assert_close(assigner(random_logits(5, seed=6), 0.1), after)
    assert set(assigner.state_dict()) == {"center"}


def test_built_on_meta_then_init_weights():
    with torch.device("meta"):
        assigner = SoftmaxCentering(6)
    assert assigner.center.is_meta
    assigner.to_empty(device="cpu")
    assigner.init_weights()
    assert torch.equal(assigner.center, torch.zeros(1, 6))


def _sharded_worker(rank, world_size, batches):
    assigner = SoftmaxCentering(6, momentum=0.7)
    probs = [assigner(shards[rank], 0.05) for shards in batches]
    return probs, assigner.center.clone()


def test_two_ranks_equal_one_rank_on_the_concatenation():
    full_batches = [random_logits(10, seed=7), random_logits(10, seed=8), random_logits(10, seed=9)]
    sizes = [(5, 5), (3, 7), (0, 10)]
    batches = [list(torch.split(batch, split)) for batch, split in zip(full_batches, sizes)]
    per_rank = spawn(_sharded_worker, 2, batches)
    single = SoftmaxCentering(6, momentum=0.7)
    for step, batch in enumerate(full_batches):
        expected = single(batch, 0.05)
        result = torch.cat([per_rank[rank][0][step] for rank in range(2)])
        torch.testing.assert_close(result, expected)
    for rank in range(2):
        torch.testing.assert_close(per_rank[rank][1], single.center)
