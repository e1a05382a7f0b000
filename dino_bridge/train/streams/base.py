"""What a stream is, and the context one step shares between the streams.

Legend: B images per rank, P patches of a global-size view, K prototypes, D width.

A *stream* groups a family of loss terms with the views they read (METHOD §2, §4): the core
stream (DINO + iBOT + KoLeo on the multi-crop views), Crop-Resize, PatchRoll and the bridge. It
declares

- ``terms``: its ``LossTerm``s (name, weight factors, compute function, needs);
- ``targets``: the teacher-target assigner instances it introduces (``TargetSpec``);
- ``teacher_inputs`` / ``student_inputs``: for each view kind it introduces, how to read the
  images (and masks) of that kind from the batch.

The meta-architecture runs, for the views and assigners that the step's plan needs, one teacher
backbone call, the teacher heads and the assigners, then one student backbone call and the
student heads, then each active term's ``compute``: teacher targets → student outputs → terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..terms import LossTerm, StepPlan, TargetSpec

# (images [n, 3, H, W], masks bool [n, P] or None, local-crop flag) of one student view kind
StudentInput = tuple[torch.Tensor, torch.Tensor | None, bool]


@dataclass
class StepContext:
    """Everything a step's streams read and write.

    ``teacher[kind]`` / ``student[kind]``: the backbone outputs of that view (``x_norm_clstoken``,
    ``x_norm_patchtokens``, …) plus ``cls_logits`` [n, K] from the DINO head; ``targets[name]``: the
    output of assigner ``name``; ``terms``: the unweighted terms computed so far (the bridge gate
    reads ``ibot_loss``); ``metrics``: scalars logged with the terms (not part of the total).
    """

    batch: dict
    plan: StepPlan
    teacher_temp: float
    student_models: nn.ModuleDict
    teacher_models: nn.ModuleDict
    teacher: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    student: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.batch["batch_size"])

    def view(self, kind: str) -> torch.Tensor:
        return self.batch["views"][kind]

    def masks(self, kind: str):
        return self.batch["masks"][kind]


def ibot_head(models: nn.ModuleDict) -> nn.Module:
    """The iBOT head, or the DINO head when iBOT shares it (``ibot.separate_head: false``)."""
    return models["ibot_head"] if "ibot_head" in models else models["dino_head"]


class Stream:
    """Base class: a family of loss terms and the views and assigners they bring (see above)."""

    name: str = "stream"

    def __init__(self) -> None:
        self.terms: tuple[LossTerm, ...] = ()
        self.targets: tuple[TargetSpec, ...] = ()
        self.teacher_inputs: dict[str, Callable[[StepContext], torch.Tensor]] = {}
        self.student_inputs: dict[str, Callable[[StepContext], StudentInput]] = {}
