"""The training batches, built with exactly the invariance views that the coming steps need.

The data pipeline builds the Crop-Resize / PatchRoll sources only while a term that reads them
has a non-zero weight: a run whose stream weights are 0 throughout loads data like one without
the streams. When a step needs views the current loader does not build (a stream switching on,
e.g. at iteration 50 001 of the seed recipe), the loader is rebuilt from the current stream
position with every kind needed from there to the end. Views are keyed by (seed, rank, stream
position, kind), so the rebuilt loader yields exactly what an always-on loader would have.
"""

from __future__ import annotations

import logging

import numpy as np

from ..data.invariance import data_kinds_for
from . import build

logger = logging.getLogger("dino_bridge")


class BatchFeed:
    def __init__(self, run, source, end_iter: int):
        self.run = run
        self.source = source
        self.end_iter = end_iter
        self.warmup_batches = 0
        self.kinds: frozenset[str] = frozenset()
        self._batches = None

    def kinds_at(self, iteration: int) -> frozenset[str]:
        plan = self.run.meta.plan(iteration)
        return data_kinds_for((*plan.teacher_views, *plan.student_views))

    def kinds_from(self, iteration: int) -> frozenset[str]:
        """Every kind a step in [iteration, end) needs (vectorised over the term schedules)."""
        kinds: set[str] = set()
        for term in self.run.meta.terms:
            if np.any(term.weights(iteration, max(self.end_iter, iteration + 1))):
                kinds |= data_kinds_for((*term.teacher_views, *term.student_views))
        return frozenset(kinds)

    def start(self, iteration: int) -> None:
        """A loader positioned at ``iteration`` (warm-up batches counted), building the kinds of
        the whole rest of the run if the first step needs any, else none."""
        self.kinds = self.kinds_from(iteration) if self.kinds_at(iteration) else frozenset()
        cfg, runtime = self.run.cfg, self.run.runtime
        position = (iteration + self.warmup_batches) * int(cfg.train.batch_size_per_gpu)
        loader = build.build_loader(
            cfg,
            self.source,
            rank=runtime.rank,
            world_size=runtime.world_size,
            start_position=position,
            pin_memory=runtime.device.type == "cuda",
            invariance_kinds=self.kinds,
        )
        self._batches = iter(loader)

    def next(self, iteration: int | None = None) -> dict:
        """The next batch; for a training ``iteration``, first rebuild the loader if that step needs
        views it does not build (warm-up batches pass ``None``)."""
        if iteration is not None and not self.kinds_at(iteration) <= self.kinds:
            self.start(iteration)
            logger.info(
                "iteration %d: the data pipeline now also builds the invariance views (%s)",
                iteration,
                ", ".join(sorted(self.kinds)),
            )
        return next(self._batches)
