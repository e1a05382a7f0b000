"""``dino-bridge report RUN_DIR [--out DIR]``: the figures and the page of a run, finished or not."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .records import read_run
from .series import build_figure_specs

PAGE = "index.html"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run's output dir (metrics.jsonl, config.yaml)")
    p.add_argument("--out", default=None, help="folder for the PNGs and index.html (default: RUN_DIR/report)")


def write_report(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> tuple[Path, list[Path]]:
    """Read ``run_dir``, draw every figure into ``out_dir`` and write ``out_dir/index.html``;
    returns the page's path and the PNGs'. ValueError for a missing run dir or metrics, an
    ``out_dir`` that is a file, or no matplotlib."""
    from .figures import draw_figures  # matplotlib: the [report] extra
    from .page import render_page

    run = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    specs = build_figure_specs(run.records)
    paths = draw_figures(specs, out)
    page = out / PAGE
    page.write_text(render_page(run, specs, [p.name for p in paths]), encoding="utf-8")
    return page, paths


def main(args: argparse.Namespace) -> int:
    page, paths = write_report(args.run_dir, args.out)
    print(f"report: {page} ({len(paths)} figures: {', '.join(p.name for p in paths)})")
    return 0
