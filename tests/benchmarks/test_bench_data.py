"""The data benchmark runs the baseline and both view pipelines on real-photo JPEGs and HDF5 tiles
in its quick mode, with the invariance views, and profiles both of ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_data.py"
STAGES = (
    "decode (PIL / HDF5 read)",
    "resized crop (+flip)",
    "colour jitter",
    "gaussian blur",
    "normalise (mean/std)",
    "iBOT masks (collate)",
    "invariance: resize-paste views",
    "invariance: stack + masks (collate)",
)


def test_quick_run_compares_the_pipelines_and_profiles_ours(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--profile", "--json", str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "| source | workers | baseline img/s/core | reference img/s/core | fast img/s/core"
        " | fast ÷ baseline | fast ÷ reference |"
    ) in result.stdout
    report = json.loads(out.read_text())
    assert [(row["source"], row["workers"]) for row in report["table"]] == [("jpeg", 1), ("hdf5", 1)]
    for row in report["table"]:
        for pipeline in ("baseline", "reference", "fast"):
            assert row[f"{pipeline}_per_core"] > 0, pipeline
        assert abs(row["fast_vs_baseline"] - row["fast_per_core"] / row["baseline_per_core"]) < 1e-9
        assert abs(row["fast_vs_reference"] - row["fast_per_core"] / row["reference_per_core"]) < 1e-9
    assert "invariance views (raw and resize-paste" in report["config"]["views"]
    for pipeline in ("reference", "fast"):
        for source in ("jpeg", "hdf5"):
            profile = report["profile"][f"{pipeline}/{source}"]
            shares = profile["share"]
            assert abs(sum(shares.values()) - 1.0) < 1e-6
            for stage in STAGES:
                assert profile["ms_per_image"][stage] > 0, (pipeline, source, stage)
            assert shares["other (views glue, sampler, Python)"] < 0.5  # the stages account for the time
        hue = "adjust_hue (fast_ops.py)" if pipeline == "fast" else "adjust_hue (_color.py)"
        assert report["profile"][f"{pipeline}/jpeg"]["jitter_ms_per_image"][hue] > 0
