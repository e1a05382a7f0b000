"""The user's seed YAML, shrunk only in size, under ``torchrun --nproc_per_node=2`` on the CPU (gloo)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, SEED_YAML, make_image_folder, read_metrics

# Only the overrides the foundation issue allows: sizes, lengths, workers, the data list.
SIZE_OVERRIDES = [
    "student.arch=vit_tiny",
    "dino.head_n_prototypes=256",
    "ibot.head_n_prototypes=256",
    "dino.head_hidden_dim=64",
    "ibot.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_bottleneck_dim=32",
    "train.batch_size_per_gpu=4",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "train.OFFICIAL_EPOCH_LENGTH=2",
    "optim.epochs=2",
    "train.num_workers=0",
    "checkpointing.period=2",
]


def _torchrun(tmp_path, extra: list[str]):
    images = make_image_folder(tmp_path / "images", n=20, size=48)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(images.rglob("*.png"))) + "\n")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "dino_bridge.train", "--config-file", str(SEED_YAML), "--output-dir", str(out),
        *SIZE_OVERRIDES, f"data.imagenet_1k.txt_path={listing}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_seed_yaml_trains_under_torchrun_with_identical_ranks(tmp_path):
    out, result = _torchrun(tmp_path, ["dtch.enabled=false"])
    summary = json.loads((out / "run_summary.json").read_text())
    assert len(summary["param_checksums"]) == 2
    assert summary["param_checksums"][0] == summary["param_checksums"][1], result.stderr[-3000:]
    records = read_metrics(out)
    assert [r["iteration"] for r in records] == [0, 3]  # the first and the last (log_period 10)
    assert (out / "ckpt" / "4" / "teacher_backbone.safetensors").is_file()
    log = (out / "train.log").read_text()
    assert "rank 0/2" in log and "backend gloo" in log
    # the seed's execution settings apply: FSDP2 (SHARD_GRAD_OP), bf16 compute, selective recompute
    assert "parallelism: FSDP2 (reshard_after_forward=False), params bf16, reduce fp32," in log
    assert "activation checkpointing selective" in log
    assert "train.compile: skipped on cpu" in log
    assert "teacher targets: sinkhorn_knopp" in log


def test_seed_yaml_with_dtch_trains_under_torchrun(tmp_path):
    """DTCH on for DINO and iBOT, the seed's dtch section as written except smaller windows."""
    out, result = _torchrun(tmp_path, ["dtch.cls_hist_cache=64", "dtch.patch_hist_cache=256"])
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["param_checksums"][0] == summary["param_checksums"][1], result.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "teacher targets: dtch" in log, log
    assert "window steps: dino_cls: 4, ibot_patch: " in log, log  # 64 // (2 ranks × 8 rows)
    record = read_metrics(out)[-1]
    for instance in ("dino_cls", "ibot_patch"):
        for name in ("history_entropy", "log_k", "protos_used_soft", "protos_used_sharp", "target_entropy",
                     "boosted", "history_max", "history_min"):  # fmt: skip
            assert f"dtch/{instance}/{name}" in record, f"dtch/{instance}/{name}"
    assert 0 < record["dtch/dino_cls/history_entropy"] <= record["dtch/dino_cls/log_k"]
    state = __import__("torch").load(out / "ckpt" / "4" / "trainer_state.pt", weights_only=False)
    assert state["warmup_batches"] >= 4, state
    assert state["samples_consumed_per_rank"] == (4 + state["warmup_batches"]) * 4, state


STREAM_SCHEDULES = [
    f"resize_shuffle_augmentor.{name}.zero_epochs=1"
    for name in (
        "resize_paste_loss_weight",
        "patch_shuffle_loss_weight",
        "bridge_patchshuffle_weight",
        "bridge_global_weight",
    )
]
STREAMS = [
    "crops.global_crops_size=64",  # a 4×4 grid: the sparse PatchRoll set is not empty
    "crops.local_crops_size=32",
    "optim.epochs=4",
    "train.log_period=1",
    "checkpointing.period=100",
    "dtch.cls_hist_cache=64",
    "dtch.patch_hist_cache=256",
    "resize_shuffle_augmentor.bridge_ibot_gate=null",
    *STREAM_SCHEDULES,
]
AUX = (
    "aug/resize_paste_cls_loss",
    "aug/patchshuffle_cls_loss",
    "aug/patchshuffle_patch_loss",
    "aug/bridge_global_loss",
    "aug/bridge_patchshuffle_loss",
)


@pytest.mark.slow
def test_seed_yaml_streams_switch_on_and_resume_exactly_under_torchrun(tmp_path):
    """The seed's streams with zero_epochs=1 (on from iteration 3 of 8): stopped at 2, before the
    switch-on point, then resumed past it, the per-step losses equal an uninterrupted run's."""
    full, result = _torchrun(tmp_path / "full", STREAMS)
    part, _ = _torchrun(tmp_path / "part", [*STREAMS, "train.stop_at_iteration=2"])
    resumed, result2 = _torchrun(tmp_path / "part", STREAMS)
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == list(range(8))
    for ra, rb in zip(a, b):
        keys = [k for k in ra if k.endswith("loss") or k.startswith("aug/")]
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["iteration"]
    assert not any(k in a[2] for k in AUX) and a[2]["aug/resize_paste_cls_loss_weight"] == 0.0
    for record in a[3:]:
        for name in AUX:
            assert name in record and math.isfinite(record[name]), (name, record["iteration"])
        assert record["aug/patchshuffle_patch_tokens"] > 0
    for out, res in ((full, result), (resumed, result2)):
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["param_checksums"][0] == summary["param_checksums"][1], res.stderr[-3000:]
    log = (resumed / "train.log").read_text()
    assert "iteration 3: the data pipeline now also builds the invariance views (raw, resizepaste)" in log
