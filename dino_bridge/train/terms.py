"""Loss terms, declared once; the schedules, the plan of a step, the total and the metrics follow.

A ``LossTerm`` is a name, its weight factors (constants or per-iteration schedules), the function
that computes it, and what that function needs: teacher views, student views, teacher-target
assigners. Its *effective weight* at iteration t is the product of its factors at t (METHOD §4).
A term runs only where its effective weight is non-zero, and so does everything it needs: a
forward or an assigner that no active term asks for is not run (``StepPlan``).

Naming rule (metrics.jsonl, the report): term ``X`` is logged unweighted as ``X`` and with the
weight that multiplied it in the total as ``X_weight``. A ``gate`` (the bridge's iBOT gate) is a
runtime factor decided inside the step: a closed gate sets that weight to 0 and skips the term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Factor = float | np.ndarray  # a constant, or one value per iteration (a schedule)


def factor_at(factor: Factor, iteration: int) -> float:
    if isinstance(factor, np.ndarray):
        return float(factor[min(max(iteration, 0), len(factor) - 1)])
    return float(factor)


def factor_values(factor: Factor, start: int, end: int) -> np.ndarray:
    """The factor's values at iterations [start, end)."""
    if isinstance(factor, np.ndarray):
        index = np.clip(np.arange(start, end), 0, len(factor) - 1)
        return factor[index]
    return np.full(max(end - start, 0), float(factor))


@dataclass(frozen=True)
class LossTerm:
    name: str
    factors: tuple[Factor, ...]
    compute: Callable[[Any], torch.Tensor]  # (StepContext) -> scalar tensor, unweighted
    teacher_views: tuple[str, ...] = ()
    student_views: tuple[str, ...] = ()
    assigners: tuple[str, ...] = ()
    gate: Callable[[Any], bool] | None = None  # (StepContext) -> open?, decided in the step

    def weight(self, iteration: int) -> float:
        """The effective weight: the product of the factors at ``iteration``."""
        return float(np.prod([factor_at(f, iteration) for f in self.factors]))

    def weights(self, start: int, end: int) -> np.ndarray:
        """Effective weights at iterations [start, end)."""
        values = np.ones(max(end - start, 0))
        for f in self.factors:
            values = values * factor_values(f, start, end)
        return values

    def first_active(self, start: int, end: int) -> int | None:
        """The first iteration in [start, end) with a non-zero effective weight, or None."""
        active = np.nonzero(self.weights(start, end))[0]
        return None if active.size == 0 else start + int(active[0])


@dataclass(frozen=True)
class TargetSpec:
    """One teacher-target assigner instance: its name, which history window it uses ("cls" or
    "patch"), and the teacher logits it balances, read from the step context."""

    name: str
    window: str
    logits: Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class StepPlan:
    """What one iteration runs: the terms with a non-zero effective weight and what they need."""

    weights: dict[str, float]  # every declared term's effective (scheduled) weight
    terms: tuple[LossTerm, ...]  # the active ones, in declaration order
    teacher_views: tuple[str, ...] = field(default=())
    student_views: tuple[str, ...] = field(default=())
    assigners: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, declared: Sequence[LossTerm], iteration: int, target_order: Sequence[str]) -> StepPlan:
        weights = {term.name: term.weight(iteration) for term in declared}
        active = tuple(term for term in declared if weights[term.name] != 0.0)
        needed = {name for term in active for name in term.assigners}
        return cls(
            weights=weights,
            terms=active,
            teacher_views=_ordered_union(term.teacher_views for term in active),
            student_views=_ordered_union(term.student_views for term in active),
            # assigners run in one fixed order (their declaration order) on every rank
            assigners=tuple(name for name in target_order if name in needed),
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(term.name for term in self.terms)


def _ordered_union(groups: Iterable[Sequence[str]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        seen.update(dict.fromkeys(group))
    return tuple(seen)


def check_unique(terms: Sequence[LossTerm], targets: Sequence[TargetSpec]) -> None:
    for kind, names in (("loss term", [t.name for t in terms]), ("target", [t.name for t in targets])):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        assert not duplicates, f"{kind}s declared twice: {duplicates}"
    known = {t.name for t in targets}
    for term in terms:
        missing = set(term.assigners) - known
        assert not missing, f"{term.name} needs undeclared assigners {sorted(missing)}"
