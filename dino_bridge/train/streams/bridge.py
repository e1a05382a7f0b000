"""The Patch-to-CLS bridge: the student's patch grid, through the bridge and the student DINO head
(no gradient into the head), predicts the teacher's CLS targets of the raw sources (METHOD §5).

Legend: B images per rank, P patches, D width, K prototypes.

    aug/bridge_global_loss       = CE([head(bridge(global crop 1)); head(bridge(global crop 2))],
                                      [q_raw_cls_r; q_raw_cls_o])            (one mean over 2B rows)
    aug/bridge_patchshuffle_loss = ½·(CE(head(bridge(shift_r)), q_raw_cls_r) + CE(…_o, q_raw_cls_o))

Global crop 1 pairs with ``raw_r`` and crop 2 with ``raw_o``; shift images with their source. The
bridge-global term reuses the student's (iBOT-masked) global patch tokens of the main forward. The
bridge output is clamped to ±``input_clamp`` before the head and the logits to ±``logit_clamp``
(the reference's 10 and 30). Both terms apply only while the iBOT loss of this step, averaged over
ranks, is below ``ibot_gate`` (``None``: always): the gate is decided after the core terms, once per
step, by one all-reduce, and a closed gate skips the bridge forward entirely.
"""

from __future__ import annotations

import torch

from ...data.invariance import SOURCES
from ...distributed import dist
from ..terms import Factor, LossTerm
from .base import StepContext, Stream
from .patch_roll import SHIFT_VIEWS
from .resize_paste import RAW_VIEWS, cls_cross_entropy

RAW_CLS = tuple(f"raw_cls_{s}" for s in SOURCES)


class BridgeStream(Stream):
    name = "bridge"

    def __init__(
        self,
        global_weight: Factor,
        patchshuffle_weight: Factor,
        *,
        ibot_gate: float | None = 4.0,
        input_clamp: float = 10.0,
        logit_clamp: float = 30.0,
        student_temp: float = 0.1,
    ):
        super().__init__()
        self.ibot_gate = None if ibot_gate is None else float(ibot_gate)
        self.input_clamp = float(input_clamp)
        self.logit_clamp = float(logit_clamp)
        self.student_temp = float(student_temp)
        self.terms = (
            LossTerm(
                "aug/bridge_global_loss",
                (global_weight,),
                self.bridge_global,
                teacher_views=RAW_VIEWS,
                student_views=("global",),
                assigners=RAW_CLS,
                gate=self.gate_open,
            ),
            LossTerm(
                "aug/bridge_patchshuffle_loss",
                (patchshuffle_weight,),
                self.bridge_patchshuffle,
                teacher_views=RAW_VIEWS,
                student_views=SHIFT_VIEWS,
                assigners=RAW_CLS,
                gate=self.gate_open,
            ),
        )

    def gate_open(self, ctx: StepContext) -> bool:
        """Whether this step's iBOT loss, averaged over ranks, is below the gate (collective)."""
        if self.ibot_gate is None:
            return True
        if "bridge_gate_open" not in ctx.cache:
            ibot = ctx.terms["ibot_loss"].detach().float().reshape(1)
            ctx.cache["bridge_gate_open"] = bool(dist.all_reduce(ibot, op="mean").item() < self.ibot_gate)
        return ctx.cache["bridge_gate_open"]

    def _logits(self, ctx: StepContext, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[n, P, D] patch tokens → bridge → clamp → student DINO head, frozen → clamp: [n, K]."""
        vectors = ctx.student_models["bridge"](patch_tokens).clamp(-self.input_clamp, self.input_clamp)
        logits = ctx.student_models["dino_head"](vectors, frozen=True)
        return logits.clamp(-self.logit_clamp, self.logit_clamp)

    def bridge_global(self, ctx: StepContext) -> torch.Tensor:
        logits = self._logits(ctx, ctx.student["global"]["x_norm_patchtokens"])  # [2B, K]
        targets = torch.cat([ctx.targets[name] for name in RAW_CLS])  # crop 1 ↔ r, crop 2 ↔ o
        return cls_cross_entropy(logits, targets, self.student_temp)

    def bridge_patchshuffle(self, ctx: StepContext) -> torch.Tensor:
        tokens = torch.cat([ctx.student[kind]["x_norm_patchtokens"] for kind in SHIFT_VIEWS])
        logits = self._logits(ctx, tokens).chunk(len(SOURCES))
        losses = [
            cls_cross_entropy(z, ctx.targets[name], self.student_temp) for z, name in zip(logits, RAW_CLS)
        ]
        return 0.5 * (losses[0] + losses[1])
