"""The teacher-target interface.

A teacher-target strategy ("assigner") turns teacher logits into target probabilities:

    probs = assigner(logits, teacher_temp)      # logits [N, K] (any float dtype) -> probs [N, K] fp32

Rows of ``probs`` sum to 1. N may differ between ranks; strategies that balance over the batch
(Sinkhorn-Knopp, DTCH) do so over the rows of *all* ranks, through the collectives of
``dino_bridge.distributed.dist`` (no-ops in a single process), so every rank must call the
assigner the same number of times in the same order.

State (an EMA centre, the DTCH history window) lives in the module: ``state_dict()`` /
``load_state_dict()`` round-trip it, and it is identical on every rank. ``snapshot()`` returns a
cheap undo record of the state and ``restore(record)`` puts it back, so a training step that is
skipped (a non-finite loss on some rank) leaves no trace. ``diagnostics()`` returns scalars worth
logging (may be empty).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TeacherAssigner(nn.Module):
    """Base class: subclasses implement ``forward(logits, teacher_temp) -> probs``."""

    def forward(self, logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def snapshot(self) -> Any:
        """An undo record of the mutable state (default: a copy of the state dict)."""
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in self.state_dict().items()}

    def restore(self, record: Any) -> None:
        self.load_state_dict(record)

    def diagnostics(self) -> dict[str, float]:
        return {}
