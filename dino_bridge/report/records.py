"""What a run directory holds for the report: the metrics records, the resolved config and the
evaluation results written next to them.

``metrics.jsonl`` is appended one line per logged iteration while the run goes on, so the last line
may be half written when the report reads it: an unparseable *last* line is skipped (and counted);
an unparseable line anywhere else is a damaged file and an error naming the line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
SUMMARY = "run_summary.json"  # written by the loop when the run ends


@dataclass
class RunRecords:
    """One run directory, read."""

    run_dir: Path
    records: list[dict]  # metrics.jsonl, in file order
    skipped_partial_line: bool  # the last line was unparseable (a run still writing it)
    config_text: str | None  # config.yaml verbatim, None when absent
    summary: dict | None  # run_summary.json, None while the run goes on
    evaluations: dict[str, dict] = field(default_factory=dict)  # other *.json next to it, by file name

    @property
    def keys(self) -> list[str]:
        """Every key of any record, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    @property
    def finished(self) -> bool:
        return self.summary is not None


def parse_metrics_lines(lines: list[str], source: str) -> tuple[list[dict], bool]:
    """The records of ``lines`` (blank lines ignored) and whether a partial last line was skipped.

    Raises ValueError naming ``source`` and the line for an unparseable line before the last, or a
    line that is JSON but not an object with an ``iteration``.
    """
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records, skipped = [], False
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except ValueError:
            if position == len(numbered) - 1:  # being written right now
                skipped = True
                break
            raise ValueError(f"{source}: line {number} is not valid JSON (a damaged metrics file)") from None
        if not isinstance(record, dict) or "iteration" not in record:
            raise ValueError(f"{source}: line {number} is not a metrics record (no 'iteration')")
        records.append(record)
    return records, skipped


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """``parse_metrics_lines`` of a file; ValueError when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {path.name} in {path.parent} (is it a training run's output dir?)")
    return parse_metrics_lines(path.read_text(encoding="utf-8", errors="replace").splitlines(), str(path))


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing, unreadable or not an object (a file being
    written, or something that is not a result: the page just leaves it out)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_run(run_dir: str | os.PathLike) -> RunRecords:
    """Read ``run_dir``; ValueError for a missing directory, a missing metrics file or one with no
    complete record yet."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run dir {str(run_dir)!r} does not exist (or is not a directory)")
    records, skipped = read_metrics(run_dir / METRICS)
    if not records:
        raise ValueError(f"{run_dir / METRICS} holds no complete record yet")
    config = run_dir / CONFIG
    evaluations = {}
    for path in sorted(run_dir.glob("*.json")):
        if path.name != SUMMARY and (value := _read_json(path)) is not None:
            evaluations[path.name] = value
    return RunRecords(
        run_dir=run_dir,
        records=records,
        skipped_partial_line=skipped,
        config_text=config.read_text(encoding="utf-8", errors="replace") if config.is_file() else None,
        summary=_read_json(run_dir / SUMMARY),
        evaluations=evaluations,
    )


def as_number(value) -> float | None:
    """A record value as a float (booleans as 0/1; NaN kept), None for anything not numeric."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def flatten_scalars(value, prefix: str = "") -> dict[str, float | str]:
    """The scalar leaves of a JSON value by dotted path (lists by index), e.g.
    ``{"knn_after": {"top1": {"20": 71.2}}}`` -> ``{"knn_after.top1.20": 71.2}``."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        number = as_number(value)
        if number is not None and not isinstance(value, bool) and math.isfinite(number):
            return {prefix: value}
        return {prefix: str(value)} if value is not None else {}
    out: dict[str, float | str] = {}
    for key, child in items:
        out.update(flatten_scalars(child, f"{prefix}.{key}" if prefix else str(key)))
    return out
