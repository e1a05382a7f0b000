"""The data benchmark runs both pipelines on real-photo JPEGs and HDF5 tiles in its quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_data.py"


def test_quick_run_compares_both_pipelines_and_profiles_ours(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--profile", "--json", str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| source | workers | baseline img/s/core | ours img/s/core | ours ÷ baseline |" in result.stdout
    report = json.loads(out.read_text())
    assert [(row["source"], row["workers"]) for row in report["table"]] == [("jpeg", 1), ("hdf5", 1)]
    for row in report["table"]:
        assert row["baseline_per_core"] > 0 and row["ours_per_core"] > 0
        assert abs(row["ratio"] - row["ours_per_core"] / row["baseline_per_core"]) < 1e-9
    assert "invariance views not included" in report["config"]["views"]
    for source in ("jpeg", "hdf5"):
        profile = report["profile"][source]
        shares = profile["share"]
        assert abs(sum(shares.values()) - 1.0) < 1e-6
        for stage in ("decode (PIL / HDF5 read)", "resized crop (+flip)", "colour jitter", "gaussian blur",
                      "normalise (to float, mean/std)", "iBOT masks (collate)"):  # fmt: skip
            assert profile["ms_per_image"][stage] > 0, (source, stage)
        assert shares["other (views glue, sampler, Python)"] < 0.5  # the stages account for the time
