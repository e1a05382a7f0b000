"""FSDP2 on a CPU gloo mesh of 2 ranks: parity with plain data parallel, resharding checkpoints,
rank-consistent skipping of non-finite steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_utils import spawn
from tests.helpers import LOSS_KEYS, make_image_folder, read_metrics, tiny_config

FP32 = ["compute_precision.param_dtype=fp32"]


def _train_rank(rank, world, images, out, overrides, checkpoint_dir=None, poison=None):
    """Run the real trainer on this rank; ``poison=(rank, call)`` makes that rank's loss NaN once."""
    from dino_bridge.distributed.device import Runtime
    from dino_bridge.train.loop import train
    from dino_bridge.train.meta_arch import SSLMetaArch

    if poison is not None and poison[0] == rank:
        original, calls = SSLMetaArch.compute_losses, {"n": 0}

        def poisoned(self, ctx):
            total, terms, weights = original(self, ctx)
            calls["n"] += 1
            return (total * float("nan") if calls["n"] == poison[1] else total), terms, weights

        SSLMetaArch.compute_losses = poisoned
    runtime = Runtime(torch.device("cpu"), "gloo", rank, world, rank)
    cfg = tiny_config(images, iterations=4, period=2, extra=overrides)
    summary = train(cfg, runtime, out, checkpoint_dir=checkpoint_dir)
    return json.loads(json.dumps(summary, default=str))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), n=24)


@pytest.fixture(scope="module")
def fsdp_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_train_rank, 2, images, out, FP32 + ["compute_precision.parallel=fsdp"])
    return out


def _by_iteration(out):
    return {r["iteration"]: r for r in read_metrics(out)}


def test_fsdp_matches_plain_data_parallel(images, fsdp_run, tmp_path):
    spawn(_train_rank, 2, images, tmp_path / "dp", FP32 + ["compute_precision.parallel=dp"])
    dp, fsdp = _by_iteration(tmp_path / "dp"), _by_iteration(fsdp_run)
    assert sorted(dp) == sorted(fsdp) == [0, 1, 2, 3]
    assert "FSDP2" in (fsdp_run / "train.log").read_text()
    for it in dp:
        for key in (*LOSS_KEYS, "backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm"):
            # Gradient norms are taken before clipping: a reduction that summed instead of
            # averaging across the 2 ranks would double them.
            np.testing.assert_allclose(fsdp[it][key], dp[it][key], rtol=1e-4, err_msg=f"{key} at {it}")
    a = load_file(tmp_path / "dp/ckpt/4/teacher_backbone.safetensors")
    b = load_file(fsdp_run / "ckpt/4/teacher_backbone.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    summary = json.loads((fsdp_run / "run_summary.json").read_text())
    assert len(set(summary["param_checksums"])) == 1  # full parameters agree across ranks


def test_two_rank_checkpoint_resumes_on_two_ranks_exactly(images, fsdp_run, tmp_path):
    spawn(
        _train_rank, 2, images, tmp_path / "again", FP32 + ["compute_precision.parallel=fsdp"],
        str(fsdp_run / "ckpt" / "2"),
    )  # fmt: skip
    resumed, full = _by_iteration(tmp_path / "again"), _by_iteration(fsdp_run)
    assert sorted(resumed) == [2, 3]
    for it in (2, 3):
        for key in LOSS_KEYS:
            assert resumed[it][key] == pytest.approx(full[it][key], rel=1e-6), (key, it)


def test_two_rank_checkpoint_loads_on_one_process(images, fsdp_run, tmp_path):
    from dino_bridge.distributed.device import Runtime
    from dino_bridge.train.checkpoint import load_checkpoint
    from dino_bridge.train.loop import build_run

    ckpt = fsdp_run / "ckpt" / "2"
    cfg = tiny_config(images, iterations=4, period=2, extra=FP32)
    run = build_run(cfg, Runtime(torch.device("cpu"), None, 0, 1, 0), tmp_path)
    state = load_checkpoint(ckpt, student=run.student, teacher=run.teacher, optimizer=run.optimizer)
    assert state["iteration"] == 2 and state["world_size"] == 2
    for part in ("student", "teacher"):
        exported = load_file(ckpt / f"{part}_backbone.safetensors")
        loaded = getattr(run, part)["backbone"].state_dict()
        for name, value in exported.items():
            assert torch.equal(loaded[name], value), f"{part}.{name}"
    assert all(s["step"] == 2 for s in run.optimizer.state.values())
    # and a one-process run continues from it to the end
    from tests.helpers import run_training

    run_training(tiny_config(images, iterations=4, period=2, extra=FP32), tmp_path / "one", checkpoint_dir=str(ckpt))
    assert sorted(_by_iteration(tmp_path / "one")) == [2, 3]


def _load_on_rank(rank, world, images, ckpt):
    from dino_bridge.distributed.device import Runtime
    from dino_bridge.train.checkpoint import full_state_dict, load_checkpoint
    from dino_bridge.train.loop import build_run

    cfg = tiny_config(images, iterations=4, period=2, extra=FP32 + ["compute_precision.parallel=fsdp"])
    run = build_run(cfg, Runtime(torch.device("cpu"), "gloo", rank, world, rank), ckpt.parent)
    assert run.plan.fsdp
    load_checkpoint(ckpt, student=run.student, teacher=run.teacher, optimizer=run.optimizer)
    exported = load_file(ckpt / "teacher_backbone.safetensors")
    consolidated = full_state_dict(run.teacher["backbone"])  # collective; the full copy is on rank 0
    if rank != 0:
        return None
    return all(torch.equal(consolidated[k], v) for k, v in exported.items())


def test_one_process_checkpoint_resumes_on_two_ranks(images, tmp_path):
    from tests.helpers import run_training

    run_training(tiny_config(images, iterations=4, period=2, extra=FP32), tmp_path / "one")
    assert spawn(_load_on_rank, 2, images, tmp_path / "one" / "ckpt" / "2") == [True, None]
    spawn(
        _train_rank, 2, images, tmp_path / "two", FP32 + ["compute_precision.parallel=fsdp"],
        str(tmp_path / "one" / "ckpt" / "2"),
    )  # fmt: skip
    assert sorted(_by_iteration(tmp_path / "two")) == [2, 3]


def test_nan_on_one_rank_skips_the_step_on_every_rank(images, tmp_path):
    """Rank 1's loss is NaN at the last iteration: both ranks skip it, nobody hangs, nothing changes."""
    overrides = FP32 + ["compute_precision.parallel=fsdp", "checkpointing.period=3"]
    spawn(_train_rank, 2, images, tmp_path / "run", overrides, None, (1, 4), timeout=240)
    records = read_metrics(tmp_path / "run")
    assert [r["skipped_step"] for r in records] == [False, False, False, True]
    before = torch.load(tmp_path / "run/ckpt/3/trainer_state.pt", weights_only=False)
    after = torch.load(tmp_path / "run/ckpt/4/trainer_state.pt", weights_only=False)
    for name, state in before["assigners"].items():
        for key, value in state.items():
            other = after["assigners"][name][key]
            same = torch.equal(value, other) if torch.is_tensor(value) else value == other
            assert same, f"{name}.{key} changed on a skipped step"
    for part in ("student_backbone", "teacher_backbone"):
        a = load_file(tmp_path / f"run/ckpt/3/{part}.safetensors")
        b = load_file(tmp_path / f"run/ckpt/4/{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part
