"""Draw ``FigureSpec``s as PNG files with matplotlib, headless.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no display is needed, no global
backend is switched in the caller's process, and nothing is left open between figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .series import FigureSpec, Panel

PANEL_WIDTH_IN, PANEL_HEIGHT_IN, DPI = 5.6, 3.0, 100
LEGEND_INSIDE_MAX = 3


class MissingMatplotlibError(ValueError):
    """matplotlib, the ``[report]`` extra, is not installed (a user error: exit code 2)."""


def _matplotlib():
    """matplotlib's Figure and Agg canvas, or a MissingMatplotlibError naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise MissingMatplotlibError(
            "dino-bridge report draws its figures with matplotlib, which is not installed:"
            " pip install 'dino_bridge[report]'"
        ) from None
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _draw_panel(ax, panel: Panel, colors: dict[str, str]) -> None:
    for line in panel.lines:
        if line.reference:
            ax.plot(line.x, line.y, linestyle="--", color="0.35", linewidth=1.0, label=line.label)
        else:
            color = colors.setdefault(line.label, f"C{len(colors) % 10}")  # a label's colour, every panel
            ax.plot(line.x, line.y, marker="o" if panel.markers else None, markersize=3,
                    linewidth=1.4, label=line.label, color=color)  # fmt: skip
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("iteration", fontsize=9)
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel, fontsize=9)
    if panel.log_y and all((line.y[np.isfinite(line.y)] > 0).all() for line in panel.lines):
        ax.set_yscale("log")
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if panel.counts:
        top = max([1.0, *(float(np.nanmax(line.y)) for line in panel.lines)])
        ax.set_ylim(-0.05 * top, 1.1 * top)
        ax.yaxis.get_major_locator().set_params(integer=True)
    if len(panel.lines) > LEGEND_INSIDE_MAX:  # many lines: beside the panel, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    elif len(panel.lines) > 1:
        ax.legend(fontsize=7, loc="best")


def draw_figure(spec: FigureSpec, path: str | Path) -> Path:
    """Write ``spec`` as a PNG at ``path`` (two panels per row)."""
    Figure, FigureCanvasAgg = _matplotlib()
    columns = min(spec.columns, len(spec.panels))
    rows = math.ceil(len(spec.panels) / columns)
    panel_width = PANEL_WIDTH_IN * (2 if spec.columns == 1 else 1)  # a one-column figure: wide panels
    figure = Figure(figsize=(panel_width * columns, PANEL_HEIGHT_IN * rows + 0.5), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    colors: dict[str, str] = {}
    for ax, panel in zip(axes, spec.panels):
        _draw_panel(ax, panel, colors)
    for ax in axes[len(spec.panels) :]:
        ax.set_visible(False)
    figure.suptitle(spec.title, fontsize=12)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def draw_figures(specs: list[FigureSpec], out_dir: str | Path) -> list[Path]:
    """``out_dir/<spec.name>.png`` for every spec; returns the paths in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw_figure(spec, out_dir / f"{spec.name}.png") for spec in specs]
