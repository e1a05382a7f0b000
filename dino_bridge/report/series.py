"""Group the metrics records into figure specifications: plain data that ``figures`` draws and the
page lists, so what the report shows is testable without matplotlib.

Nothing here knows a loss term by name. The groups follow naming rules:

- a loss term is every ``X`` with an ``X_weight`` key (``train/terms.py``): its unweighted value
  ``X``, its contribution to the total ``X * X_weight`` and its effective weight;
- ``*_grad_norm``: per-part gradient norms before clipping;
- ``dtch/<instance>/<stat>``: the DTCH diagnostics of one assigner instance (``assign/dtch.py``);
- keys starting with ``knn``: online kNN evaluation, at the iterations it ran;
- every numeric key not claimed by a group goes to the "other metrics" figures.

The schedule, throughput, memory and skipped-image keys are the loop's own (``train/loop.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .records import as_number

WEIGHT_SUFFIX = "_weight"
GRAD_NORM_SUFFIX = "_grad_norm"
DTCH_PREFIX = "dtch/"
KNN_PREFIX = "knn"
TOTAL = "total_loss"
SCHEDULES = (  # (panel title, keys): train/schedules.py's values of each iteration
    ("learning rate", ("lr", "last_layer_lr")),
    ("weight decay", ("wd",)),
    ("teacher temperature", ("teacher_temp",)),
    ("teacher momentum", ("mom",)),
)
OTHER_PANELS_PER_FIGURE = 6


@dataclass(frozen=True)
class Line:
    label: str
    x: np.ndarray  # iterations
    y: np.ndarray  # values (NaN: a gap)
    reference: bool = False  # drawn dashed: a bound to compare with (log K, K)


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[Line, ...]
    ylabel: str = ""
    log_y: bool = False
    markers: bool = False  # sparse series (online kNN): points as well as lines
    counts: bool = False  # whole numbers from 0 (skipped images, boosted prototypes)


@dataclass(frozen=True)
class FigureSpec:
    name: str  # the PNG's file stem
    title: str
    panels: tuple[Panel, ...]
    keys: tuple[str, ...]  # the metrics keys it draws
    columns: int = 2  # panels per row


# ------------------------------------------------------------------------------ series
def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of the records that hold ``key`` as a number."""
    points = [(r["iteration"], as_number(r[key])) for r in records if key in r]
    points = [(it, v) for it, v in points if v is not None]
    if not points:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*points)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def term_series(records: Sequence[dict], term: str, weighted: bool) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of a loss term over the records that hold its weight. Unweighted: NaN
    (a gap) where the term did not run. Weighted, ``term * term_weight``: 0 where the weight is 0
    and the term did not run, NaN where a non-zero weight has no value."""
    x, y = [], []
    for record in records:
        weight = as_number(record.get(term + WEIGHT_SUFFIX))
        if weight is None:
            continue
        value = as_number(record.get(term))
        x.append(record["iteration"])
        if value is None:
            y.append(0.0 if weighted and weight == 0 else math.nan)
        else:
            y.append(value * weight if weighted else value)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def last_value(records: Sequence[dict], key: str) -> tuple[int, float] | None:
    """(iteration, value) of the last record holding ``key`` as a finite number."""
    for record in reversed(records):
        value = as_number(record.get(key))
        if value is not None and math.isfinite(value):
            return int(record["iteration"]), value
    return None


def _line(records: Sequence[dict], key: str, label: str | None = None, reference: bool = False) -> Line:
    x, y = series(records, key)
    return Line(label or key, x, y, reference)


def _has_data(line: Line) -> bool:
    return bool(np.isfinite(line.y).any())


def _panel(title: str, lines: Iterable[Line], **kwargs) -> Panel | None:
    """A panel of the lines that hold data; None when none does."""
    kept = tuple(line for line in lines if _has_data(line))
    return Panel(title, kept, **kwargs) if any(not line.reference for line in kept) else None


def _figure(
    name: str, title: str, panels: Iterable[Panel | None], keys: Iterable[str], columns: int = 2
) -> FigureSpec | None:
    kept = tuple(p for p in panels if p is not None)
    return FigureSpec(name, title, kept, tuple(dict.fromkeys(keys)), columns) if kept else None


# ------------------------------------------------------------------------------ naming rules
def loss_terms(keys: Iterable[str]) -> list[str]:
    """Every ``X`` with an ``X_weight`` key, in first-seen order (the naming rule)."""
    suffix = len(WEIGHT_SUFFIX)
    return [key[:-suffix] for key in keys if key.endswith(WEIGHT_SUFFIX) and len(key) > suffix]


def dtch_instances(keys: Iterable[str]) -> dict[str, list[str]]:
    """``{instance: [stat, ...]}`` of the ``dtch/<instance>/<stat>`` keys, in first-seen order."""
    out: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split("/")
        if key.startswith(DTCH_PREFIX) and len(parts) == 3:
            out.setdefault(parts[1], []).append(parts[2])
    return out


def knn_keys(keys: Iterable[str]) -> list[str]:
    return [key for key in keys if key.startswith(KNN_PREFIX)]


# ------------------------------------------------------------------------------ the figures
def losses_figure(records: Sequence[dict], keys: Sequence[str]) -> FigureSpec | None:
    terms = loss_terms(keys)
    if not terms:
        return None
    total = [_line(records, TOTAL)] if TOTAL in keys else []
    unweighted = [Line(t, *term_series(records, t, weighted=False)) for t in terms]
    contributions = [Line(t, *term_series(records, t, weighted=True)) for t in terms]
    panels = (
        _panel("loss terms (unweighted; gaps where a term did not run)", unweighted),
        _panel("weighted contributions (term × weight)", [*contributions, *total]),
        _panel("effective weights", [_line(records, t + WEIGHT_SUFFIX, t) for t in terms]),
    )
    claimed = [*terms, *(t + WEIGHT_SUFFIX for t in terms), *([TOTAL] if total else [])]
    return _figure("losses", "Losses", panels, claimed, columns=1)


def schedules_figure(records: Sequence[dict]) -> FigureSpec | None:
    panels = [_panel(title, [_line(records, k) for k in group]) for title, group in SCHEDULES]
    return _figure("schedules", "Schedules", panels, [k for _, group in SCHEDULES for k in group])


def throughput_figure(records: Sequence[dict]) -> FigureSpec | None:
    x, share = series(records, "data_wait_share")
    panels = (
        _panel("throughput", [_line(records, "images_per_sec", "images/s")], ylabel="images / s"),
        _panel("share of the step time spent waiting for data", [Line("data wait", x, 100 * share)],
               ylabel="%"),
    )  # fmt: skip
    return _figure("throughput", "Throughput", panels, ["images_per_sec", "data_wait_share"])


def memory_figure(records: Sequence[dict]) -> FigureSpec | None:
    panel = _panel("peak memory (device allocator; RSS on CPU)", [_line(records, "max_mem_mb", "peak")],
                   ylabel="MiB")  # fmt: skip
    return _figure("memory", "Memory", [panel], ["max_mem_mb"])


def skipped_figure(records: Sequence[dict]) -> FigureSpec | None:
    images, steps = _line(records, "skipped_images", "images"), _line(records, "skipped_step", "skipped")
    panels = (
        _panel("unreadable images skipped (all ranks, cumulative)", [images], counts=True),
        _panel("non-finite steps skipped (1 = skipped)", [steps], markers=True, counts=True),
    )
    return _figure("skipped", "Skipped images and steps", panels, ["skipped_images", "skipped_step"])


def grad_norms_figure(records: Sequence[dict], keys: Sequence[str]) -> FigureSpec | None:
    norms = [k for k in keys if k.endswith(GRAD_NORM_SUFFIX)]
    lines = [_line(records, k, k[: -len(GRAD_NORM_SUFFIX)]) for k in norms]
    panel = _panel("gradient norms before clipping, per part", lines, log_y=True)
    return _figure("grad_norms", "Gradient norms", [panel], norms)


def knn_figure(records: Sequence[dict], keys: Sequence[str]) -> FigureSpec | None:
    """Accuracy-like kNN keys (``top``/``acc`` in the name) share a panel; any other its own."""
    found = knn_keys(keys)
    accuracy = [k for k in found if "top" in k or "acc" in k]
    panels = [_panel("online kNN accuracy", [_line(records, k) for k in accuracy], ylabel="%", markers=True)]
    panels += [_panel(k, [_line(records, k)], markers=True) for k in found if k not in accuracy]
    return _figure("knn", "Online kNN evaluation", panels, found)


DTCH_PANELS = (  # (title, stats drawn, reference lines: (label, function of log K), panel options)
    ("history entropy vs log K", ("history_entropy",), (("log K", lambda log_k: log_k),), {}),
    ("prototypes used over the window", ("protos_used_soft", "protos_used_sharp"), (("K", np.exp),),
     {"log_y": True}),
    ("target entropy (last call) vs log K", ("target_entropy",), (("log K", lambda log_k: log_k),), {}),
    ("boosted (rare) prototypes, last call", ("boosted",), (), {"counts": True}),
)  # fmt: skip


def dtch_figure(records: Sequence[dict], instance: str, stats: Sequence[str]) -> FigureSpec | None:
    def key(stat: str) -> str:
        return f"{DTCH_PREFIX}{instance}/{stat}"

    x, log_k = series(records, key("log_k"))
    panels, drawn = [], {"log_k"}
    for title, names, references, options in DTCH_PANELS:
        lines = [_line(records, key(s), s) for s in names if s in stats]
        if "log_k" in stats:
            lines += [Line(label, x, f(log_k), reference=True) for label, f in references]
        panels.append(_panel(title, lines, **options))
        drawn.update(names)
    rest = [s for s in stats if s not in drawn]  # history_max / min, and any stat added later
    lines = [_line(records, key(s), s) for s in rest]
    panels.append(_panel("other diagnostics: " + ", ".join(rest), lines, log_y=True))
    return _figure(f"dtch_{instance}", f"DTCH diagnostics: {instance}", panels, [key(s) for s in stats])


def other_figures(records: Sequence[dict], keys: Sequence[str], claimed: set[str]) -> list[FigureSpec]:
    """One panel per numeric key no group drew, ``OTHER_PANELS_PER_FIGURE`` per figure."""
    panels = [(k, _panel(k, [_line(records, k)])) for k in keys if k not in claimed and k != "iteration"]
    panels = [(k, p) for k, p in panels if p is not None]
    out = []
    for start in range(0, len(panels), OTHER_PANELS_PER_FIGURE):
        chunk = panels[start : start + OTHER_PANELS_PER_FIGURE]
        number = start // OTHER_PANELS_PER_FIGURE + 1
        out.append(FigureSpec(f"other_{number}", "Other metrics", tuple(p for _, p in chunk),
                              tuple(k for k, _ in chunk)))  # fmt: skip
    return out


def build_figure_specs(records: Sequence[dict]) -> list[FigureSpec]:
    """Every figure the records support, in page order; groups without data are left out."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    specs = [
        losses_figure(records, keys),
        schedules_figure(records),
        throughput_figure(records),
        memory_figure(records),
        skipped_figure(records),
        knn_figure(records, keys),
        grad_norms_figure(records, keys),
        *(dtch_figure(records, name, stats) for name, stats in dtch_instances(keys).items()),
    ]
    specs = [s for s in specs if s is not None]
    claimed = {k for s in specs for k in s.keys}
    return specs + other_figures(records, keys, claimed)
