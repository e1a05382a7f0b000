"""The assigner benchmark runs end to end in its quick mode and writes complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_assign.py"
METHODS = {"softmax_centering", "sinkhorn_3", "dtch", "dtch_entropy"}


def test_quick_run_reports_every_method_and_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--json", str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "| N | K | method |" in result.stdout and "DTCH/Sinkhorn" in result.stdout
    report = json.loads(out.read_text())
    assert report["copy_bandwidth_gb_s"] > 0
    sizes = report["settings"]["sizes"]
    assert [entry["n"] for entry in report["results"]] == sizes
    for entry in report["results"]:
        assert set(entry["methods"]) == METHODS
        assert entry["floor_ms"] > 0 and entry["dtch_over_sinkhorn"] > 0
        assert entry["dtch_capacity"] == max(1, report["settings"]["history"] // entry["n"])
        for stats in entry["methods"].values():
            assert 0 < stats["min_ms"] <= stats["median_ms"]
            assert len(stats["samples_ms"]) == report["settings"]["repeats"]
