from itertools import islice

import pytest

from dino_bridge.data.sampler import ShardedInfiniteSampler


def _take(sampler, count):
    return list(islice(iter(sampler), count))


@pytest.mark.parametrize("reshuffle", [True, False])
def test_positions_count_and_shard_size(reshuffle):
    sampler = ShardedInfiniteSampler(10, rank=1, world_size=3, seed=0, reshuffle_each_pass=reshuffle)
    assert sampler.shard_size == 3
    items = _take(sampler, 9)
    assert [position for _, position in items] == list(range(9))
    assert all(0 <= index < 10 for index, _ in items)
    for pass_start in (0, 3, 6):  # no repeats within a pass
        assert len({index for index, _ in items[pass_start : pass_start + 3]}) == 3


@pytest.mark.parametrize("reshuffle", [True, False])
def test_shards_disjoint_within_a_pass_and_cover_the_data(reshuffle):
    world_size, size = 4, 20
    samplers = [
        ShardedInfiniteSampler(size, rank=r, world_size=world_size, seed=7, reshuffle_each_pass=reshuffle)
        for r in range(world_size)
    ]
    for pass_index in range(3):
        shards = [set(s.pass_indices(pass_index).tolist()) for s in samplers]
        assert all(len(shard) == 5 for shard in shards)
        assert set().union(*shards) == set(range(size))  # disjoint and covering (20 = 4 × 5)


def test_reshuffle_modes_differ_in_what_a_rank_sees():
    fixed = ShardedInfiniteSampler(40, rank=0, world_size=4, seed=1, reshuffle_each_pass=False)
    moving = ShardedInfiniteSampler(40, rank=0, world_size=4, seed=1, reshuffle_each_pass=True)
    fixed_passes = [fixed.pass_indices(p).tolist() for p in range(3)]
    assert len({frozenset(p) for p in fixed_passes}) == 1  # same 1/W subset every pass
    assert len({tuple(p) for p in fixed_passes}) == 3  # in a new order each pass
    moving_passes = [frozenset(moving.pass_indices(p).tolist()) for p in range(3)]
    assert len(set(moving_passes)) == 3  # a new shard each pass


@pytest.mark.parametrize("reshuffle", [True, False])
@pytest.mark.parametrize("start", [0, 1, 5, 6, 17])
def test_resume_from_start_equals_uninterrupted_tail(reshuffle, start):
    options = dict(rank=1, world_size=2, seed=3, reshuffle_each_pass=reshuffle)
    uninterrupted = _take(ShardedInfiniteSampler(13, **options), start + 20)
    resumed = _take(ShardedInfiniteSampler(13, start=start, **options), 20)
    assert resumed == uninterrupted[start:]


def test_seed_changes_order_and_errors():
    a = _take(ShardedInfiniteSampler(50, rank=0, world_size=1, seed=0), 50)
    b = _take(ShardedInfiniteSampler(50, rank=0, world_size=1, seed=1), 50)
    assert a != b and sorted(i for i, _ in a) == list(range(50))
    with pytest.raises(ValueError, match="3 items.*world_size 4"):
        ShardedInfiniteSampler(3, rank=0, world_size=4, seed=0)
    with pytest.raises(ValueError, match="rank"):
        ShardedInfiniteSampler(10, rank=2, world_size=2, seed=0)
