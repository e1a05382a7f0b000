"""Schedules are data: one value per iteration, in numpy arrays you can index, plot and test.

Shape of every schedule (METHOD §6): a linear warm-up from ``start`` to ``peak`` over the warm-up
iterations (end point excluded), then a cosine from ``peak`` to ``end`` (both end points included)
over ``cosine`` iterations (default: the rest of training), then ``end`` for any remainder.
Loss-weight factors (``loss_weight_factor``) are a constant or such a schedule that first stays at
``start`` for ``zero_epochs``; a term's effective weight is the product of its factors
(``train/terms.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def warmup_cosine(
    start: float,
    peak: float,
    end: float,
    warmup_iters: int,
    total_iters: int,
    cosine_iters: int | None = None,
) -> np.ndarray:
    """[total_iters] float64: linear ``start→peak`` (warm-up), cosine ``peak→end``, then ``end``."""
    warmup_iters = max(0, min(int(warmup_iters), total_iters))
    warmup = np.linspace(start, peak, warmup_iters, endpoint=False)
    remaining = total_iters - warmup_iters
    cosine_len = remaining if cosine_iters is None else max(0, min(int(cosine_iters), remaining))
    u = np.linspace(0.0, 1.0, cosine_len)
    cosine = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * u))
    tail = np.full(remaining - cosine_len, end, dtype=np.float64)
    return np.concatenate([warmup, cosine, tail]).astype(np.float64)


def lr_scale(scaling_rule: str, global_batch_size: int) -> float:
    """Multiplier applied to the peak and end learning rates."""
    if scaling_rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(global_batch_size / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return global_batch_size / 256.0
    if scaling_rule == "none":
        return 1.0
    raise ValueError(f"unknown scaling rule {scaling_rule!r}; valid: sqrt_wrt_1024, linear_wrt_256, none")


@dataclass
class ScheduleSpec:
    start: float
    peak: float
    end: float
    warmup_epochs: float = 0.0
    cosine_epochs: float | None = None
    zero_epochs: float = 0.0


def build_schedule(spec: ScheduleSpec, epoch_length: int, total_iters: int) -> np.ndarray:
    """A schedule over ``total_iters`` iterations (1 epoch = ``epoch_length`` iterations)."""
    zero = min(int(spec.zero_epochs * epoch_length), total_iters)
    warmup = int(spec.warmup_epochs * epoch_length)
    cosine = None if spec.cosine_epochs is None else int(spec.cosine_epochs * epoch_length)
    body = warmup_cosine(spec.start, spec.peak, spec.end, warmup, total_iters - zero, cosine)
    return np.concatenate([np.full(zero, spec.start, dtype=np.float64), body])


def aux_weight_spec(value) -> ScheduleSpec:
    """A number (a constant weight) or a mapping {start, peak, end, zero_epochs, warmup_epochs, …}."""
    if isinstance(value, (int, float)):
        return ScheduleSpec(float(value), float(value), float(value))
    fields = dict(value)
    return ScheduleSpec(
        start=float(fields.get("start", 0.0)),
        peak=float(fields.get("peak", fields.get("start", 0.0))),
        end=float(fields.get("end", fields.get("peak", 0.0))),
        warmup_epochs=float(fields.get("warmup_epochs", 0.0)),
        cosine_epochs=None if fields.get("cosine_epochs") is None else float(fields["cosine_epochs"]),
        zero_epochs=float(fields.get("zero_epochs", 0.0)),
    )


def loss_weight_factor(value, epoch_length: int, total_iters: int) -> float | np.ndarray:
    """A number stays a constant; a mapping {start, peak, end, zero_epochs, …} becomes one value per
    iteration over ``total_iters`` (at iteration ``zero_epochs · epoch_length`` it is still ``start``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return build_schedule(aux_weight_spec(value), epoch_length, total_iters)


@dataclass
class TrainingSchedules:
    """Per-iteration arrays for the optimisation schedules."""

    lr: np.ndarray
    last_layer_lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    def at(self, iteration: int) -> dict[str, float]:
        i = min(iteration, len(self.lr) - 1)
        return {
            "lr": float(self.lr[i]),
            "last_layer_lr": float(self.last_layer_lr[i]),
            "wd": float(self.weight_decay[i]),
            "mom": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
        }


def build_training_schedules(
    *,
    lr: ScheduleSpec,
    weight_decay: ScheduleSpec,
    momentum: ScheduleSpec,
    teacher_temp: ScheduleSpec,
    freeze_last_layer_epochs: float,
    epoch_length: int,
    total_iters: int,
    lr_multiplier: float,
) -> TrainingSchedules:
    """The lr's peak and end (not its start) are multiplied by ``lr_multiplier`` (the scaling rule)."""
    scaled = ScheduleSpec(
        lr.start, lr.peak * lr_multiplier, lr.end * lr_multiplier, lr.warmup_epochs, lr.cosine_epochs
    )
    lr_values = build_schedule(scaled, epoch_length, total_iters)
    last_layer = lr_values.copy()
    last_layer[: int(freeze_last_layer_epochs * epoch_length)] = 0.0
    return TrainingSchedules(
        lr=lr_values,
        last_layer_lr=last_layer,
        weight_decay=build_schedule(weight_decay, epoch_length, total_iters),
        momentum=build_schedule(momentum, epoch_length, total_iters),
        teacher_temp=build_schedule(teacher_temp, epoch_length, total_iters),
    )
