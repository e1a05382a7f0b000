"""The suite's own switch: tests marked slow are skipped unless ``--run-slow`` (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

SLOW = {
    "tests/dist/test_torchrun.py::test_seed_yaml_streams_switch_on_and_resume_exactly_under_torchrun",
    "tests/dist/test_shards_dist.py::test_shards_on_two_ranks_are_disjoint_and_resume_exactly",
    "tests/benchmarks/test_bench_step.py::test_quick_run_with_every_stream_on",
    "tests/benchmarks/test_quality_fmnist.py::test_quick_run_tables_each_variant_and_resume_keeps_finished_runs",
}


def _pytest(*args: str) -> str:
    files = sorted({node.split("::")[0] for node in SLOW})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, *files],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    return done.stdout + done.stderr


def test_slow_runs_are_skipped_by_default_and_run_with_the_flag() -> None:
    listed = _pytest("--run-slow", "-m", "slow", "--collect-only", "-q")
    assert {line for line in listed.splitlines() if "::" in line} == SLOW, listed
    # without the flag, -m slow selects the same four and skips each with the reason
    skipped = _pytest("-m", "slow", "-rs", "-q")
    assert "4 skipped" in skipped and "pytest --run-slow runs it" in skipped, skipped
