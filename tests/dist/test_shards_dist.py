"""Tar shards on 2 gloo ranks: the index is counted by rank 0 only, the ranks read disjoint samples,
and a run stopped halfway resumes exactly."""

from __future__ import annotations

import json

import pytest

from tests.distributed_utils import spawn
from tests.helpers import LOSS_KEYS, read_metrics, tiny_config
from tests.source_files import write_shards


def _train_rank(rank, world, pattern, out, extra):
    import torch

    from dino_bridge.data.sources import shards as shards_module
    from dino_bridge.distributed.device import Runtime
    from dino_bridge.train.loop import train

    counted, loaded = [], []
    count, load = shards_module.count_samples, shards_module.ShardSource.load
    shards_module.count_samples = lambda path: counted.append(path) or count(path)
    shards_module.ShardSource.load = lambda self, i: loaded.append(self.describe(i)) or load(self, i)
    runtime = Runtime(torch.device("cpu"), "gloo", rank, world, rank)
    overrides = [
        "data.fashion_mnist.root=null",
        f"data.fashion_mnist.shards={pattern}",
        "dtch.warmup_history=false",
    ]
    overrides += extra
    summary = train(tiny_config(out, iterations=4, period=2, extra=overrides), runtime, out)
    return {"counted": counted, "loaded": loaded, "summary": json.loads(json.dumps(summary, default=str))}


def _losses(out):
    return {r["iteration"]: [r[k] for k in LOSS_KEYS] for r in read_metrics(out)}


@pytest.mark.slow
def test_shards_on_two_ranks_are_disjoint_and_resume_exactly(tmp_path):
    write_shards(tmp_path / "shards", counts=(12, 12, 12))
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    first = spawn(_train_rank, 2, pattern, tmp_path / "full", [])
    assert len(first[0]["counted"]) == 3 and first[1]["counted"] == []  # counted once, by rank 0
    rank0, rank1 = set(first[0]["loaded"]), set(first[1]["loaded"])
    assert rank0 and rank1 and not rank0 & rank1
    checksums = first[0]["summary"]["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]

    part = spawn(_train_rank, 2, pattern, tmp_path / "resumed", ["train.stop_at_iteration=2"])
    assert part[0]["counted"] == []  # the index of the first run is up to date
    spawn(_train_rank, 2, pattern, tmp_path / "resumed", [])
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(full) == sorted(resumed) == [0, 1, 2, 3]
    for it in range(4):
        assert resumed[it] == full[it], f"iteration {it}: {resumed[it]} != {full[it]}"
