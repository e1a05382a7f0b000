"""The step benchmark runs the real trainer's step end to end in its quick mode and writes complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dino_bridge.distributed.device import cpu_has_fast_bf16

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_step.py"
# bf16 is emulated on a CPU without AVX-512/AMX (75-125x slower): the smoke runs there take fp32
DTYPE = [] if cpu_has_fast_bf16() else ["--dtype", "fp32"]
STAGES = {"teacher forward + targets", "student forward", "losses", "backward", "optimizer step", "EMA"}


def test_quick_run_times_steps_fills_dtch_and_profiles(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--json", str(out)]
    cmd += [*DTYPE, "--profile", "--profile-steps", "1", "--label", "smoke"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| variant | device | arch |" in result.stdout and "| smoke | cpu | vit_tiny |" in result.stdout
    report = json.loads(out.read_text())
    assert report["status"] == "ok"
    timing = report["timing"]
    assert len(timing["step_s"]) == timing["steps"] == 3 and timing["skip"] == 1
    assert min(timing["step_s"][1:]) <= timing["median_s"] <= max(timing["step_s"][1:])
    assert report["memory"]["peak_rss_mb"] >= report["memory"]["rss_before_steps_mb"] > 0
    assert report["config"]["teacher_targets"] == "dtch" and report["config"]["k"] == 256
    # results are committed: no path of the machine that ran them
    assert report["config"]["yaml"] == "configs/dinov3_vitlarge_pretrain.yaml"
    assert str(tmp_path) not in out.read_text() and str(REPO) not in out.read_text()
    # every DTCH window was filled before the timed steps
    for name in ("dino_cls", "ibot_patch"):
        window = report["dtch"][name]
        assert window["history_full"] and window["fill_calls"] == window["window_rows"] - 1
    assert set(report["profile"]["stages_s"]) >= STAGES
    assert report["profile"]["top_ops"]["self_cpu_time_total"]


@pytest.mark.slow
def test_quick_run_with_every_stream_on(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--json", str(out)]
    cmd += [*DTYPE, "--streams", "--label", "streams"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    terms = set(report["config"]["terms"])
    assert {"aug/resize_paste_cls_loss", "aug/patchshuffle_patch_loss", "aug/bridge_global_loss"} <= terms
    assert report["config"]["bridge_ibot_gate"] is None
    for name in ("resize_paste_r", "raw_cls_o", "patchshuffle_patch_r"):
        assert report["dtch"][name]["history_full"], name
