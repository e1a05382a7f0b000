"""The core stream: DINO CLS, iBOT masked patches and KoLeo on the multi-crop views (METHOD §2).

Legend: B images per rank, n_l local crops per image, P patches per global crop, M masked
patches, K prototypes, D width. Global crops are crop-major: rows [0, B) are every image's first
global crop, rows [B, 2B) the second.

Terms (weights are constants): ``dino_local_crops_loss`` and ``dino_global_crops_loss`` (weighted
by their pair counts, 16/18 and 2/18 for 2 globals and 8 locals), ``ibot_loss``,
``koleo_loss_cls`` (pre-head global CLS, per crop, averaged) and ``koleo_loss_patch`` (unmasked
global patch tokens, shuffled, in chunks of 2B rows). Assigners: ``dino_cls`` (teacher CLS of
the global crops) and ``ibot_patch`` (teacher patch tokens at the student's masked positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...losses import (
    dino_cross_entropy,
    dino_loss_weights,
    ibot_cross_entropy,
    koleo_loss,
    koleo_loss_chunked,
)
from ..terms import LossTerm, TargetSpec
from .base import StepContext, Stream, ibot_head


@dataclass(frozen=True)
class CoreSettings:
    """Plain values of the core terms (the trainer fills them from the config)."""

    n_global_crops: int = 2
    n_local_crops: int = 8
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_cls_weight: float = 0.1
    koleo_patch_weight: float = 0.0
    koleo_cls_gate: bool = False
    koleo_patch_gate: bool = False
    koleo_cls_gate_threshold: float = 0.0
    koleo_patch_gate_threshold: float = 0.0
    koleo_gate_slope: float = 0.1
    global_ignore_diagonal: bool = True
    student_temp: float = 0.1
    apply_masks: bool = True  # iBOT masks on the student's global crops (ibot weight > 0, or forced)


class CoreStream(Stream):
    name = "core"

    def __init__(self, settings: CoreSettings):
        super().__init__()
        self.settings = s = settings
        local_scale, global_scale = dino_loss_weights(
            s.n_global_crops, s.n_local_crops, s.global_ignore_diagonal
        )
        self.terms = (
            LossTerm(
                "dino_local_crops_loss",
                (s.dino_weight * local_scale,),
                self.dino_local,
                teacher_views=("global",),
                student_views=("global", "local"),
                assigners=("dino_cls",),
            ),
            LossTerm(
                "dino_global_crops_loss",
                (s.dino_weight * global_scale,),
                self.dino_global,
                teacher_views=("global",),
                student_views=("global",),
                assigners=("dino_cls",),
            ),
            LossTerm(
                "ibot_loss",
                (s.ibot_weight,),
                self.ibot,
                teacher_views=("global",),
                student_views=("global",),
                assigners=("ibot_patch",),
            ),
            LossTerm("koleo_loss_cls", (s.koleo_cls_weight,), self.koleo_cls, student_views=("global",)),
            LossTerm(
                "koleo_loss_patch", (s.koleo_patch_weight,), self.koleo_patch, student_views=("global",)
            ),
        )
        self.targets = (
            TargetSpec("dino_cls", "cls", lambda ctx: ctx.teacher["global"]["cls_logits"]),
            TargetSpec("ibot_patch", "patch", self._teacher_ibot_logits),
        )
        self.teacher_inputs = {"global": lambda ctx: ctx.view("global")}
        self.student_inputs = {
            "global": lambda ctx: (
                ctx.view("global"),
                ctx.masks("global").masks if s.apply_masks else None,
                False,
            ),
            "local": lambda ctx: (ctx.view("local"), None, True),
        }

    # ------------------------------------------------------------------ teacher side
    def _teacher_ibot_logits(self, ctx: StepContext) -> torch.Tensor:
        patches = ctx.teacher["global"]["x_norm_patchtokens"].flatten(0, 1)[ctx.masks("global").indices]
        return ibot_head(ctx.teacher_models)(patches)

    def _dino_targets(self, ctx: StepContext) -> torch.Tensor:
        """[2, B, K] teacher targets of the two global crops."""
        return ctx.targets["dino_cls"].reshape(self.settings.n_global_crops, ctx.batch_size, -1)

    # ------------------------------------------------------------------ terms
    def dino_local(self, ctx: StepContext) -> torch.Tensor:
        logits = ctx.student["local"]["cls_logits"]
        student = logits.reshape(-1, ctx.batch_size, logits.shape[-1])
        return dino_cross_entropy(student, self._dino_targets(ctx), student_temp=self.settings.student_temp)

    def dino_global(self, ctx: StepContext) -> torch.Tensor:
        logits = ctx.student["global"]["cls_logits"]
        return dino_cross_entropy(
            logits.reshape(self.settings.n_global_crops, ctx.batch_size, -1),
            self._dino_targets(ctx),
            student_temp=self.settings.student_temp,
            ignore_diagonal=self.settings.global_ignore_diagonal,
        )

    def ibot(self, ctx: StepContext) -> torch.Tensor:
        masks = ctx.masks("global")
        patches = ctx.student["global"]["x_norm_patchtokens"].flatten(0, 1)[masks.indices]
        return ibot_cross_entropy(
            ibot_head(ctx.student_models)(patches),
            ctx.targets["ibot_patch"],
            masks.weights,
            n_images=masks.masks.shape[0],
            student_temp=self.settings.student_temp,
        )

    def koleo_cls(self, ctx: StepContext) -> torch.Tensor:
        """KoLeo on the pre-head CLS of each global crop separately, averaged over crops."""
        s = self.settings
        per_crop = ctx.student["global"]["x_norm_clstoken"].float().chunk(s.n_global_crops)
        losses = [
            koleo_loss(
                x,
                gate=s.koleo_cls_gate,
                gate_threshold=s.koleo_cls_gate_threshold,
                gate_slope=s.koleo_gate_slope,
            )
            for x in per_crop
        ]
        return torch.stack(losses).mean()

    def koleo_patch(self, ctx: StepContext) -> torch.Tensor:
        """KoLeo on the unmasked global patch tokens, shuffled, in chunks of 2B rows."""
        s = self.settings
        patches = ctx.student["global"]["x_norm_patchtokens"]
        tokens = patches.float().flatten(0, 1)
        if s.apply_masks:
            tokens = tokens[~ctx.masks("global").masks.flatten()]
        return koleo_loss_chunked(
            tokens,
            chunk_size=patches.shape[0],
            gate=s.koleo_patch_gate,
            gate_threshold=s.koleo_patch_gate_threshold,
            gate_slope=s.koleo_gate_slope,
        )
