"""The report's HTML page: one self-contained file next to its PNGs (embedded by relative path),
with the final values, the evaluation results found next to the metrics and the resolved config.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from html import escape

import numpy as np

from .records import RunRecords, flatten_scalars
from .series import WEIGHT_SUFFIX, FigureSpec, last_value, loss_terms, term_series

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.meta { color: #555; } .warn { color: #a40; }
table { border-collapse: collapse; margin: .4em 1.2em .8em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .2em .6em; text-align: right; }
td:first-child, th:first-child { text-align: left; font-family: monospace; }
.tables { display: flex; flex-wrap: wrap; align-items: flex-start; }
.tables h3 { font-size: 1em; margin: .3em 0; }
img { max-width: 100%; border: 1px solid #eee; margin-bottom: 1em; }
pre { background: #f6f6f6; padding: .8em; font-size: .85em; overflow-x: auto; }
nav a { margin-right: .8em; }
"""


def fmt(value) -> str:
    """A value for a table cell: integers as integers, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return escape(str(value))
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence], caption: str | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    title = f"<h3>{escape(caption)}</h3>" if caption else ""
    return f"<div>{title}<table><tr>{head}</tr>{body}</table></div>"


def losses_table(records: Sequence[dict]) -> str:
    """Last unweighted value, weight and contribution of every term (naming rule), and the total."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    rows = []
    for term in loss_terms(keys):
        value, weight = last_value(records, term), last_value(records, term + WEIGHT_SUFFIX)
        _, contributions = term_series(records, term, weighted=True)
        finite = contributions[np.isfinite(contributions)]
        rows.append([
            term,
            value[1] if value else "not run",
            weight[1] if weight else "",
            finite[-1] if finite.size else "",
        ])  # fmt: skip
    total = last_value(records, "total_loss")
    if total:
        rows.append(["total_loss", "", "", total[1]])
    if not rows:
        return ""
    at = int(records[-1]["iteration"])
    return _table(["term", "unweighted", "weight", "contribution"], rows, f"losses (iteration {at})")


def final_values(records: Sequence[dict], specs: Sequence[FigureSpec]) -> str:
    """The losses table, then the last value of every other key drawn, one table per figure."""
    parts = [losses_table(records)]
    for spec in specs:
        if spec.name == "losses":
            continue
        rows = [[k, *reversed(v)] for k in spec.keys if (v := last_value(records, k)) is not None]
        if rows:
            parts.append(_table(["key", "last value", "iteration"], rows, spec.title))
    return '<div class="tables">' + "".join(p for p in parts if p) + "</div>"


def knn_results(value, path: str = "") -> list[tuple[str, dict]]:
    """Every ``{"top1": {k: accuracy}}`` inside a JSON value (``eval knn``, the quickstart), by path."""
    found = []
    if isinstance(value, dict):
        if isinstance(value.get("top1"), dict):
            found.append((path or "(file)", value["top1"]))
        for key, child in value.items():
            if key != "top1":
                found += knn_results(child, f"{path}.{key}" if path else str(key))
    return found


def evaluations_section(evaluations: dict[str, dict]) -> str:
    if not evaluations:
        return "<p>No evaluation results (JSON files) next to the metrics.</p>"
    parts = []
    for name, value in evaluations.items():
        parts.append(f"<h3>{escape(name)}</h3>")
        found = knn_results(value)
        ks = list(dict.fromkeys(k for _, top1 in found for k in top1))
        if found:
            rows = [[where, *(top1.get(k, "") for k in ks)] for where, top1 in found]
            parts.append(_table(["kNN top-1 (%)", *(f"{k}-NN" for k in ks)], rows))
        scalars = flatten_scalars(value)
        parts.append(f"<details><summary>all values ({len(scalars)})</summary>")
        parts.append(_table(["key", "value"], list(scalars.items())) + "</details>")
    return "".join(parts)


def _status(run: RunRecords) -> str:
    first, last = run.records[0]["iteration"], run.records[-1]["iteration"]
    state = "finished" if run.finished else "in progress (no run_summary.json yet)"
    text = f"iterations {first}–{last}, {len(run.records)} records; {state}"
    if run.summary and run.summary.get("stopped_at") is not None:
        text += f"; stopped by a signal at iteration {run.summary['stopped_at']}"
    if run.summary and run.summary.get("checkpoint"):
        text += f"; last checkpoint {run.summary['checkpoint']}"
    return escape(text)


def render_page(run: RunRecords, specs: Sequence[FigureSpec], images: Sequence[str]) -> str:
    """The page; ``images[i]`` is the path of ``specs[i]``'s PNG relative to the page."""
    name = run.run_dir.resolve().name
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    partial = (
        '<p class="warn">The last line of metrics.jsonl was incomplete (the run is writing it) and was'
        " left out.</p>"
        if run.skipped_partial_line
        else ""
    )
    nav = "".join(f'<a href="#{escape(s.name)}">{escape(s.title)}</a>' for s in specs)
    figures = "".join(
        f'<h3 id="{escape(s.name)}">{escape(s.title)}</h3><img src="{escape(src)}" alt="{escape(s.title)}">'
        for s, src in zip(specs, images)
    )
    if run.config_text is None:
        config = "<p>No config.yaml in the run dir.</p>"
    else:
        lines = run.config_text.count("\n")
        config = (
            f"<details><summary>config.yaml ({lines} lines)</summary>"
            f"<pre>{escape(run.config_text)}</pre></details>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dino_bridge report: {escape(name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>dino_bridge run report: {escape(name)}</h1>
<p class="meta">{escape(str(run.run_dir))} · {_status(run)} · generated {now}</p>
{partial}
<nav>{nav}</nav>
<h2>Final values</h2>
{final_values(run.records, specs)}
<h2>Evaluation results</h2>
{evaluations_section(run.evaluations)}
<h2>Figures</h2>
{figures}
<h2>Resolved config</h2>
{config}
</body></html>
"""
