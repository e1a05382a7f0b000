"""Crop-Resize: the student's CLS of ``resizepaste_{r,o}`` matches the teacher's targets of
``raw_{r,o}`` (METHOD §2 term 4, §4). CLS-level alignment only.

Legend: B images per rank, K prototypes.

    aug/resize_paste_cls_loss = CE(student CLS of resizepaste_r, q_rp_r) + CE(…_o, q_rp_o)

(the two sources summed, each a mean over B, as the reference reduces it), weight
``resize_paste_loss_weight``. Assigners ``resize_paste_r`` / ``resize_paste_o`` (own DTCH state,
the CLS window). The student sees the ResizePaste images with their own iBOT-style masks and the
global CLS norm; the teacher sees the raw sources.
"""

from __future__ import annotations

import torch

from ...data.invariance import SOURCES
from ...losses import dino_cross_entropy
from ..terms import Factor, LossTerm, TargetSpec
from .base import StepContext, Stream

RAW_VIEWS = tuple(f"raw_{s}" for s in SOURCES)


def raw_teacher_inputs() -> dict:
    """The teacher reads the raw sources as they come in the batch (shared by every invariance stream)."""
    return {kind: (lambda ctx, kind=kind: ctx.view(kind)) for kind in RAW_VIEWS}


def raw_cls_logits(source: str):
    return lambda ctx: ctx.teacher[f"raw_{source}"]["cls_logits"]


def cls_cross_entropy(
    student_logits: torch.Tensor, targets: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Mean over rows of −q · log softmax(z / τ_s) for [N, K] logits and targets."""
    return dino_cross_entropy(student_logits[None], targets[None], student_temp=student_temp)


class ResizePasteStream(Stream):
    name = "resize_paste"

    def __init__(self, weight: Factor, student_temp: float = 0.1):
        super().__init__()
        self.student_temp = float(student_temp)
        views = tuple(f"resizepaste_{s}" for s in SOURCES)
        self.terms = (
            LossTerm(
                "aug/resize_paste_cls_loss",
                (weight,),
                self.resize_paste_cls,
                teacher_views=RAW_VIEWS,
                student_views=views,
                assigners=tuple(f"resize_paste_{s}" for s in SOURCES),
            ),
        )
        self.targets = tuple(TargetSpec(f"resize_paste_{s}", "cls", raw_cls_logits(s)) for s in SOURCES)
        self.teacher_inputs = raw_teacher_inputs()
        self.student_inputs = {
            kind: (lambda ctx, kind=kind: (ctx.view(kind), ctx.masks(kind).masks, False)) for kind in views
        }

    def resize_paste_cls(self, ctx: StepContext) -> torch.Tensor:
        losses = [
            cls_cross_entropy(
                ctx.student[f"resizepaste_{s}"]["cls_logits"],
                ctx.targets[f"resize_paste_{s}"],
                self.student_temp,
            )
            for s in SOURCES
        ]
        return losses[0] + losses[1]
