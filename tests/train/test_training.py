"""End-to-end runs of the real trainer on tiny models (CPU, a few steps each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_bridge.config import ConfigError
from dino_bridge.train import loop as loop_module
from dino_bridge.train.checkpoint import find_latest_checkpoint
from dino_bridge.train.meta_arch import SSLMetaArch
from tests.helpers import (
    CONFIGS,
    LOSS_KEYS,
    REPO,
    golden_threads,
    make_image_folder,
    read_metrics,
    run_training,
    tiny_config,
    tiny_overrides,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_run_losses.json"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), n=24)


def _losses(records: list[dict]) -> dict[int, list[float]]:
    return {r["iteration"]: [r[k] for k in LOSS_KEYS] for r in records}


def test_golden_losses(images, tmp_path):
    """A deterministic tiny run reproduces the stored per-step losses (regenerate: tests/golden/README.md)."""
    golden = json.loads(GOLDEN.read_text())
    cfg = tiny_config(images, iterations=golden["iterations"], period=100, extra=golden["overrides"])
    with golden_threads():
        run_training(cfg, tmp_path / "run")
    got = _losses(read_metrics(tmp_path / "run"))
    assert sorted(got) == list(range(golden["iterations"]))
    for it, expected in enumerate(golden["losses"]):
        np.testing.assert_allclose(got[it], expected, rtol=2e-5, atol=1e-6, err_msg=f"iteration {it}")


def test_resume_from_a_checkpoint_is_exact(images, tmp_path):
    run_training(tiny_config(images, iterations=6, period=3), tmp_path / "full")
    full = _losses(read_metrics(tmp_path / "full"))
    # Stop after 3 of the 6 scheduled iterations, then run the same command again: it resumes from
    # the output dir's checkpoint and the whole run equals the uninterrupted one.
    part = tiny_config(images, iterations=6, period=100, extra=["train.stop_at_iteration=3"])
    summary = run_training(part, tmp_path / "resumed")
    assert summary["checkpoint"].endswith("ckpt/3") and sorted(
        _losses(read_metrics(tmp_path / "resumed"))
    ) == [0, 1, 2]
    run_training(tiny_config(images, iterations=6, period=3), tmp_path / "resumed")
    resumed = _losses(read_metrics(tmp_path / "resumed"))
    assert sorted(resumed) == list(range(6))
    for it in range(6):
        assert resumed[it] == full[it], f"iteration {it}: {resumed[it]} != {full[it]}"
    # the final weights are identical too
    a = torch.load(tmp_path / "full/ckpt/6/trainer_state.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed/ckpt/6/trainer_state.pt", weights_only=False)
    assert a["samples_consumed_per_rank"] == b["samples_consumed_per_rank"]
    from safetensors.torch import load_file

    ta = load_file(tmp_path / "full/ckpt/6/teacher_backbone.safetensors")
    tb = load_file(tmp_path / "resumed/ckpt/6/teacher_backbone.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_explicit_checkpoint_dir_wins_and_no_resume_starts_over(images, tmp_path):
    run_training(tiny_config(images, iterations=4, period=2), tmp_path / "a")
    run_training(
        tiny_config(images, iterations=4, period=2), tmp_path / "b", checkpoint_dir=str(tmp_path / "a/ckpt/2")
    )
    assert sorted(_losses(read_metrics(tmp_path / "b"))) == [2, 3]
    run_training(tiny_config(images, iterations=4, period=2), tmp_path / "b", resume=False)
    assert sorted(_losses(read_metrics(tmp_path / "b"))) == [0, 1, 2, 3]


def _cli(output: Path, images: Path, iterations: int, period: int) -> list[str]:
    overrides = tiny_overrides(images, iterations=iterations, period=period)
    return [
        sys.executable,
        "-m",
        "dino_bridge.train",
        "--config-file",
        str(CONFIGS / "smoke_cpu.yaml"),
        "--output-dir",
        str(output),
        *overrides,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def clean_run(images, tmp_path_factory) -> dict[int, list[float]]:
    """Per-step losses of an uninterrupted 12-iteration run launched from the command line."""
    out = tmp_path_factory.mktemp("clean") / "run"
    subprocess.run(_cli(out, images, 12, 2), check=True, env=ENV, cwd=REPO, capture_output=True)
    return _losses(read_metrics(out))


def _interrupt_after_first_checkpoint(
    out: Path, images: Path, sig: signal.Signals, extra: tuple[str, ...] = (), group: bool = False
) -> subprocess.Popen:
    """Start a 12-iteration run, send ``sig`` once its first checkpoint exists, wait for it to end.

    ``group``: signal the whole process group (the run's DataLoader workers too), as a terminal's
    Ctrl-C, ``timeout`` or a scheduler's ``kill -TERM -<pgid>`` does."""
    victim = subprocess.Popen(
        _cli(out, images, 12, 2) + list(extra),
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    deadline = time.monotonic() + 120
    while find_latest_checkpoint(out / "ckpt") is None and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    if group:
        os.killpg(victim.pid, sig)
    else:
        victim.send_signal(sig)
    victim.wait(timeout=120)
    return victim


def test_sigkill_then_resume_matches_an_uninterrupted_run(images, clean_run, tmp_path):
    out = tmp_path / "killed"
    victim = _interrupt_after_first_checkpoint(out, images, signal.SIGKILL)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = int(find_latest_checkpoint(out / "ckpt").name)
    assert latest < 12
    subprocess.run(_cli(out, images, 12, 2), check=True, env=ENV, cwd=REPO, capture_output=True)
    resumed = _losses(read_metrics(out))
    assert sorted(resumed) == list(range(12)), "metrics.jsonl must read as one uninterrupted run"
    for it in range(12):
        assert resumed[it] == clean_run[it], f"iteration {it} (resumed from {latest})"


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_stops_with_a_checkpoint_its_exit_code_and_resumes_exactly(
    images, clean_run, tmp_path, sig, code
):
    out = tmp_path / "stopped"
    victim = _interrupt_after_first_checkpoint(out, images, sig)
    stderr = victim.stderr.read()
    assert victim.returncode == code, stderr[-3000:]  # 128 + the signal: a scheduler can requeue
    assert f"{sig.name} received: stopping after this iteration" in stderr
    assert "Traceback" not in stderr
    stopped = json.loads((out / "run_summary.json").read_text())["stopped_at"]
    assert stopped is not None and 2 <= stopped < 12
    assert find_latest_checkpoint(out / "ckpt").name == str(stopped)  # the iteration it stopped at
    subprocess.run(_cli(out, images, 12, 2), check=True, env=ENV, cwd=REPO, capture_output=True)
    resumed = _losses(read_metrics(out))
    for it in range(12):
        assert resumed[it] == clean_run[it], f"iteration {it} (stopped at {stopped})"


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_to_the_process_group_spares_the_data_workers(images, clean_run, tmp_path, sig, code):
    """``timeout``, SLURM and Ctrl-C signal every process of the group: the DataLoader workers
    must outlive it, so the run still stops after its checkpoint and resumes exactly."""
    out = tmp_path / "group"
    victim = _interrupt_after_first_checkpoint(out, images, sig, ("train.num_workers=2",), group=True)
    stderr = victim.stderr.read()
    assert victim.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "worker" not in stderr.lower(), stderr[-3000:]
    stopped = json.loads((out / "run_summary.json").read_text())["stopped_at"]
    assert find_latest_checkpoint(out / "ckpt").name == str(stopped)
    subprocess.run(_cli(out, images, 12, 2), check=True, env=ENV, cwd=REPO, capture_output=True)
    resumed = _losses(read_metrics(out))
    for it in range(12):
        assert resumed[it] == clean_run[it], f"iteration {it} (stopped at {stopped})"


def _odd_and_broken_images(root: Path) -> tuple[Path, list[str], list[str]]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    good = []
    for i in range(6):
        path = root / f"good{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        good.append(path)
    odd = {
        "gray.jpg": Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L"),
        "cmyk.jpg": Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "CMYK"),
        "rgba.png": Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA"),
        "sixteen.png": Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)),
        "palette.gif": Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P"),
    }
    for name, image in odd.items():
        image.save(root / name)
    jpeg = root / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    (root / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 3])
    jpeg.unlink()
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    broken = ["truncated.jpg", "empty.jpg", "text.jpg", "missing.jpg"]
    lines = [p.name for p in good] + list(odd) + broken
    listing = root / "list.txt"
    listing.write_text("# odd formats and broken files\n\n" + "\n".join(lines) + "\n")
    return listing, list(odd), broken


def test_corrupt_and_odd_images_train_to_the_end(tmp_path, caplog):
    listing, odd, broken = _odd_and_broken_images(tmp_path / "data")
    overrides = [
        "data.fashion_mnist.root=null",
        f"data.fashion_mnist.txt_path={listing}",
    ]
    cfg = tiny_config(
        tmp_path / "unused", iterations=6, period=100, extra=overrides + ["dtch.warmup_history=false"]
    )
    summary = run_training(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in records] == list(range(6))
    skipped = summary["skipped"]
    # 15 files, 24 draws: every file came up; exactly the four broken ones were skipped (with a reason)
    assert sorted(s.split(" (")[0].rsplit("/", 1)[-1] for s in skipped) == sorted(broken)
    assert records[-1]["skipped_images"] >= len(broken)
    log = (tmp_path / "run" / "train.log").read_text()
    for name in broken:
        assert f"{name} (" in log
    assert not any(name in log for name in odd), "odd formats must be converted and used, not skipped"


def test_checkpoint_retention_and_incomplete_checkpoints(images, tmp_path):
    cfg = tiny_config(
        images, iterations=6, period=1, extra=["checkpointing.max_to_keep=2", "checkpointing.keep_every=2"]
    )
    run_training(cfg, tmp_path / "run")
    root = tmp_path / "run" / "ckpt"
    assert sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) == [2, 4, 5, 6]
    ckpt = root / "6"
    for name in (
        "teacher_backbone.safetensors",
        "student_backbone.safetensors",
        "backbone.json",
        "trainer_state.pt",
    ):
        assert (ckpt / name).is_file(), name
    # a half-written checkpoint (a crash during save) is never picked for resume
    (root / ".tmp-7").mkdir()
    (root / "8").mkdir()
    (root / "8" / "dcp").mkdir()
    assert find_latest_checkpoint(root) == ckpt


def test_non_finite_step_is_skipped_without_a_trace(images, tmp_path, monkeypatch):
    original = SSLMetaArch.compute_losses
    calls = {"n": 0}

    def poisoned(self, ctx):
        total, terms, weights = original(self, ctx)
        calls["n"] += 1
        if calls["n"] == 4:  # the last of 4 iterations
            total = total * float("nan")
        return total, terms, weights

    monkeypatch.setattr(SSLMetaArch, "compute_losses", poisoned)
    run_training(tiny_config(images, iterations=4, period=3), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["skipped_step"] for r in records] == [False, False, False, True]
    before = torch.load(tmp_path / "run/ckpt/3/trainer_state.pt", weights_only=False)
    after = torch.load(tmp_path / "run/ckpt/4/trainer_state.pt", weights_only=False)
    for name in before["assigners"]:
        a, b = before["assigners"][name], after["assigners"][name]
        assert a.keys() == b.keys()
        for key in a:
            assert _equal(a[key], b[key]), f"{name}.{key} changed on a skipped step"
    from safetensors.torch import load_file

    for part in ("teacher_backbone", "student_backbone"):
        a = load_file(tmp_path / f"run/ckpt/3/{part}.safetensors")
        b = load_file(tmp_path / f"run/ckpt/4/{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test_too_many_non_finite_steps_stop_with_a_clear_message(images, tmp_path, monkeypatch):
    original = SSLMetaArch.compute_losses

    def always_nan(self, ctx):
        total, terms, weights = original(self, ctx)
        return total * float("nan"), terms, weights

    monkeypatch.setattr(SSLMetaArch, "compute_losses", always_nan)
    with pytest.raises(loop_module.NonFiniteLossError, match=r"iteration 2: 3 consecutive non-finite steps"):
        run_training(tiny_config(images, iterations=6, period=100), tmp_path / "run")


def test_pretrained_backbone_initialises_student_and_teacher(images, tmp_path):
    from safetensors.torch import load_file

    from dino_bridge.distributed.device import Runtime
    from dino_bridge.train.checkpoint import load_backbone_weights_
    from dino_bridge.train.loop import build_run

    run_training(tiny_config(images, iterations=2, period=2), tmp_path / "source")
    exported = load_file(tmp_path / "source/ckpt/2/teacher_backbone.safetensors")
    run = build_run(tiny_config(images, iterations=2), Runtime(torch.device("cpu"), None, 0, 1, 0), tmp_path)
    load_backbone_weights_(run.student["backbone"], tmp_path / "source")  # a run dir: its latest teacher
    state = run.student["backbone"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in exported.items())
    # end to end: the key is honoured (and logged), a mismatching file is refused by name
    cfg = tiny_config(images, iterations=2, extra=[f"student.pretrained_weights={tmp_path / 'source'}"])
    run_training(cfg, tmp_path / "warm")
    assert "initialised from" in (tmp_path / "warm" / "train.log").read_text()
    source = f"student.pretrained_weights={tmp_path / 'source'}"
    wrong = tiny_config(images, iterations=2, extra=["student.n_storage_tokens=3", source])
    with pytest.raises(ConfigError, match="student.pretrained_weights: .* does not match the configured"):
        run_training(wrong, tmp_path / "wrong")
