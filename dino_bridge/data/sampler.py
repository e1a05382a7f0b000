"""An endless, sharded, resumable stream of (dataset index, stream position).

Each rank consumes ``shard_size = ⌊n / W⌋`` items per pass (the n − W·shard_size leftover items of a
pass are not used in it). ``position`` counts the items this rank has consumed (0, 1, 2, ...), so item
k belongs to pass ``k // shard_size`` at offset ``k % shard_size``, and a sampler built with
``start=k`` yields exactly the stream an uninterrupted one yields from its k-th item on, in O(1) (only
the permutation of that pass is drawn). Permutations are drawn lazily, one pass at a time, with
``torch.randperm`` on an explicit generator:

- ``reshuffle_each_pass=True`` (``train.reshuffle_sampler_perm``): pass p draws a new global
  permutation from (seed, p); rank r takes its strided slice ``perm[r::W][:shard_size]``. The shards of
  one pass are disjoint, and every rank sees the whole dataset over the passes.
- ``reshuffle_each_pass=False`` (upstream): one global permutation from ``seed``; rank r always owns
  ``perm[r::W][:shard_size]`` and visits it in a new order each pass, drawn from (seed, r, p).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from dino_bridge.seeding import generator


class ShardedInfiniteSampler(Sampler):
    def __init__(
        self,
        dataset_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        reshuffle_each_pass: bool = True,
        start: int = 0,
    ) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if dataset_size < world_size:
            raise ValueError(
                f"dataset of {dataset_size} items is smaller than world_size {world_size}: "
                "every rank needs at least one item"
            )
        if start < 0:
            raise ValueError(f"sampler start position must be >= 0, got {start}")
        self.dataset_size = int(dataset_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.reshuffle_each_pass = bool(reshuffle_each_pass)
        self.start = int(start)
        self.shard_size = self.dataset_size // self.world_size
        self._fixed_shard: torch.Tensor | None = None  # reshuffle_each_pass=False: drawn once, lazily

    def _rank_shard(self, permutation: torch.Tensor) -> torch.Tensor:
        return permutation[self.rank :: self.world_size][: self.shard_size]

    def pass_indices(self, pass_index: int) -> torch.Tensor:
        """The dataset indices this rank visits in pass ``pass_index``, in order ([shard_size] long)."""
        if self.reshuffle_each_pass:
            permutation = torch.randperm(
                self.dataset_size, generator=generator(self.seed, "sampler", pass_index)
            )
            return self._rank_shard(permutation)
        if self._fixed_shard is None:
            permutation = torch.randperm(self.dataset_size, generator=generator(self.seed, "sampler"))
            self._fixed_shard = self._rank_shard(permutation)
        shard = self._fixed_shard
        order = torch.randperm(
            self.shard_size, generator=generator(self.seed, "sampler", self.rank, pass_index)
        )
        return shard[order]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pass_index, offset = divmod(self.start, self.shard_size)
        position = self.start
        while True:
            for index in self.pass_indices(pass_index)[offset:].tolist():
                yield index, position
                position += 1
            pass_index, offset = pass_index + 1, 0
