"""PatchRoll: the student sees ``shift_{r,o}``, the raw source rolled by whole patches, and matches
the teacher on the raw source, globally (CLS) and on a sparse set of aligned patches (METHOD §2
term 5, §4).

Legend: B images per rank, R×C = P patches, N aligned rows per source, K prototypes, D width.

    aug/patchshuffle_cls_loss   = CE(student CLS of shift_r, q_r) + CE(…_o, q_o)   (summed, each a B-mean)
    aug/patchshuffle_patch_loss = ½·(iBOT-CE_r + iBOT-CE_o)                        (averaged)

weights ``patch_shuffle_loss_weight · patch_shuffle_cls_weight`` and ``patch_shuffle_loss_weight ·
patch_shuffle_patch_weight`` — the schedule value multiplies the loss (in the reference it only
switched it on). The CLS targets ``raw_cls_{r,o}`` are shared with the bridge. For the patch term,
the student token at rolled position j (in the step's alignment set, shared by r and o) pairs with
the teacher's raw token inv[j], the one whose content moved to j; the teacher logits of those
tokens go through the iBOT head and the ``patchshuffle_patch_{r,o}`` assigners (patch window);
each aligned token is weighted 1/(aligned tokens of its image), the sum divided by B.
``aug/patchshuffle_patch_tokens`` logs N (the same every step: exact counts).

The shifted images are made here on the device from the raw ones (a roll is exact).
"""

from __future__ import annotations

import torch

from ...data.invariance import SOURCES
from ...data.views import aligned_token_rows, roll_images
from ...losses import ibot_cross_entropy
from ..terms import Factor, LossTerm, TargetSpec
from .base import StepContext, Stream, ibot_head
from .resize_paste import RAW_VIEWS, cls_cross_entropy, raw_cls_logits, raw_teacher_inputs

SHIFT_VIEWS = tuple(f"shift_{s}" for s in SOURCES)


class PatchRollStream(Stream):
    name = "patch_roll"

    def __init__(
        self,
        weight: Factor,
        cls_weight: Factor,
        patch_weight: Factor,
        *,
        patch_size: int,
        grid_size: tuple[int, int],
        student_temp: float = 0.1,
    ):
        super().__init__()
        self.patch_size = int(patch_size)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.student_temp = float(student_temp)
        raw_cls = tuple(f"raw_cls_{s}" for s in SOURCES)
        self.terms = (
            LossTerm(
                "aug/patchshuffle_cls_loss",
                (weight, cls_weight),
                self.patchshuffle_cls,
                teacher_views=RAW_VIEWS,
                student_views=SHIFT_VIEWS,
                assigners=raw_cls,
            ),
            LossTerm(
                "aug/patchshuffle_patch_loss",
                (weight, patch_weight),
                self.patchshuffle_patch,
                teacher_views=RAW_VIEWS,
                student_views=SHIFT_VIEWS,
                assigners=tuple(f"patchshuffle_patch_{s}" for s in SOURCES),
            ),
        )
        self.targets = (
            *(TargetSpec(f"raw_cls_{s}", "cls", raw_cls_logits(s)) for s in SOURCES),
            *(TargetSpec(f"patchshuffle_patch_{s}", "patch", self._teacher_patch_logits(s)) for s in SOURCES),
        )
        self.teacher_inputs = raw_teacher_inputs()
        self.student_inputs = {
            f"shift_{s}": (lambda ctx, s=s: (self.shifted(ctx, s), ctx.masks(f"shift_{s}").masks, False))
            for s in SOURCES
        }

    def shifted(self, ctx: StepContext, source: str) -> torch.Tensor:
        """shift_x [B, 3, S, S]: raw_x rolled by the batch's offsets (rows of ``rolls[x]``)."""
        return roll_images(ctx.view(f"raw_{source}"), ctx.batch["rolls"][source], self.patch_size)

    def _aligned_rows(self, ctx: StepContext, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"aligned_rows_{source}"
        if key not in ctx.cache:
            ctx.cache[key] = aligned_token_rows(
                ctx.masks("align").masks, ctx.batch["rolls"][source], *self.grid_size
            )
        return ctx.cache[key]

    def _teacher_patch_logits(self, source: str):
        def logits(ctx: StepContext) -> torch.Tensor:
            _, teacher_rows = self._aligned_rows(ctx, source)
            tokens = ctx.teacher[f"raw_{source}"]["x_norm_patchtokens"].flatten(0, 1)[teacher_rows]
            return ibot_head(ctx.teacher_models)(tokens)

        return logits

    def patchshuffle_cls(self, ctx: StepContext) -> torch.Tensor:
        losses = [
            cls_cross_entropy(
                ctx.student[f"shift_{s}"]["cls_logits"], ctx.targets[f"raw_cls_{s}"], self.student_temp
            )
            for s in SOURCES
        ]
        return losses[0] + losses[1]

    def patchshuffle_patch(self, ctx: StepContext) -> torch.Tensor:
        align = ctx.masks("align")
        losses = []
        for s in SOURCES:
            student_rows, _ = self._aligned_rows(ctx, s)
            tokens = ctx.student[f"shift_{s}"]["x_norm_patchtokens"].flatten(0, 1)[student_rows]
            losses.append(
                ibot_cross_entropy(
                    ibot_head(ctx.student_models)(tokens),
                    ctx.targets[f"patchshuffle_patch_{s}"],
                    align.weights,
                    n_images=ctx.batch_size,
                    student_temp=self.student_temp,
                )
            )
        ctx.metrics["aug/patchshuffle_patch_tokens"] = torch.tensor(float(align.count))
        return 0.5 * (losses[0] + losses[1])
