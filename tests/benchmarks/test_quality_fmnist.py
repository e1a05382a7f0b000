"""The teacher-target quality benchmark runs end to end in quick mode, saves as it goes, resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dino_bridge.distributed.device import cpu_has_fast_bf16

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "quality_fmnist.py"
# bf16 is emulated on a CPU without AVX-512/AMX (75-125x slower): the smoke run there takes fp32
FP32 = [] if cpu_has_fast_bf16() else ["compute_precision.param_dtype=fp32"]
QUICK = [sys.executable, str(SCRIPT), *FP32, "--quick", "--variants", "sinkhorn", "dtch_s1_one_batch"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*QUICK, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quick_run_tables_each_variant_and_resume_keeps_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    first = run(["--json", str(out)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("sinkhorn", 0), ("dtch_s1_one_batch", 0)]
    assert all(0 < r["knn20"] <= 100 and r["final_total_loss"] > 0 for r in report["runs"])
    assert 10 < report["raw_pixels_knn20"] <= 100  # ten classes: chance is 10 %
    assert [row["variant"] for row in report["summary"]] == ["sinkhorn", "dtch_s1_one_batch"]
    assert "| sinkhorn |" in first.stdout and "| raw pixels (no training) |" in first.stdout

    again = run(["--json", str(out), "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("kept from") == 2  # nothing retrained
    assert json.loads(out.read_text())["runs"] == report["runs"]

    other_budget = run(["--json", str(out), "--resume", "--batch", "16"], tmp_path)
    assert other_budget.returncode != 0 and "measured with other batch" in other_budget.stderr
