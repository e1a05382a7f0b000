"""One SSL step's model side: teacher targets → student outputs → loss terms.

Legend: B images per rank, K prototypes, D width.

The student and the teacher are ``nn.ModuleDict``s with ``backbone``, ``dino_head``, (when
``ibot.separate_head``) ``ibot_head`` and, for the student only, ``bridge`` when a bridge term can
be on. The teacher runs in eval mode without gradients. The loss terms come from *streams*
(``train/streams/``): each declares its terms, the views they read and the teacher-target
assigners they call, so a new stream never edits this file. Assigners are keyed by name, one
instance and state per target kind (METHOD §3).

A step, for its ``StepPlan`` (the terms with a non-zero effective weight at this iteration):

1. teacher: one backbone call over the teacher views the plan needs, one DINO-head call over
   their CLS tokens, then every assigner the plan needs, in one fixed order (collectives);
2. student: one backbone call over the student views (with their masks), one DINO-head call over
   their CLS tokens;
3. terms: each active term's function, in declaration order (a gated term may be skipped),
   and the total = Σ weight · term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .streams import StepContext, Stream
from .terms import LossTerm, StepPlan, TargetSpec, check_unique


class SSLMetaArch(nn.Module):
    def __init__(
        self,
        student: nn.ModuleDict,
        teacher: nn.ModuleDict,
        streams: Sequence[Stream],
        assigners: dict[str, nn.Module],
    ):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.streams = tuple(streams)
        self.terms: tuple[LossTerm, ...] = tuple(t for s in self.streams for t in s.terms)
        self.target_specs: dict[str, TargetSpec] = {t.name: t for s in self.streams for t in s.targets}
        check_unique(self.terms, [t for s in self.streams for t in s.targets])
        missing = set(self.target_specs) - set(assigners)
        assert not missing, f"no assigner built for {sorted(missing)}"
        self.assigners = nn.ModuleDict({name: assigners[name] for name in self.target_specs})
        self.teacher_inputs = {k: f for s in self.streams for k, f in s.teacher_inputs.items()}
        self.student_inputs = {k: f for s in self.streams for k, f in s.student_inputs.items()}
        self.teacher.requires_grad_(False)

    # ------------------------------------------------------------------ planning
    def plan(self, iteration: int) -> StepPlan:
        return StepPlan.of(self.terms, iteration, tuple(self.target_specs))

    def context(self, batch: dict, plan: StepPlan, teacher_temp: float) -> StepContext:
        return StepContext(batch, plan, teacher_temp, self.student, self.teacher)

    # ------------------------------------------------------------------ 1. teacher targets
    @torch.no_grad()
    def teacher_targets(self, ctx: StepContext) -> None:
        self.teacher.eval()
        kinds = ctx.plan.teacher_views
        if not kinds:
            return
        images = [self.teacher_inputs[kind](ctx) for kind in kinds]
        outputs = self.teacher["backbone"].forward_features(images)
        self._attach_cls_logits(self.teacher, kinds, outputs, ctx.teacher)
        for name in ctx.plan.assigners:
            logits = self.target_specs[name].logits(ctx)
            ctx.targets[name] = self.assigners[name](logits, ctx.teacher_temp)

    # ------------------------------------------------------------------ 2. student outputs
    def student_outputs(self, ctx: StepContext) -> None:
        kinds = ctx.plan.student_views
        if not kinds:
            return
        images, masks, local = zip(*(self.student_inputs[kind](ctx) for kind in kinds))
        outputs = self.student["backbone"].forward_features(
            list(images), masks=list(masks), local_crops=list(local)
        )
        self._attach_cls_logits(self.student, kinds, outputs, ctx.student)

    @staticmethod
    def _attach_cls_logits(models: nn.ModuleDict, kinds, outputs: list[dict], into: dict) -> None:
        """One DINO-head call over the CLS tokens of every view; the logits split back per view."""
        cls = [out["x_norm_clstoken"] for out in outputs]
        logits = models["dino_head"](torch.cat(cls)).split([c.shape[0] for c in cls])
        for kind, out, view_logits in zip(kinds, outputs, logits):
            into[kind] = {**out, "cls_logits": view_logits}

    # ------------------------------------------------------------------ 3. terms
    def compute_losses(
        self, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """(total, unweighted terms, the weight each term had in the total)."""
        weights = dict(ctx.plan.weights)
        for term in ctx.plan.terms:
            if term.gate is not None and not term.gate(ctx):
                weights[term.name] = 0.0
                continue
            ctx.terms[term.name] = term.compute(ctx)
        if not ctx.terms:
            raise ValueError(
                f"iteration plan {ctx.plan.names} leaves no loss term to train (every weight is 0)"
            )
        total = sum(weights[name] * value for name, value in ctx.terms.items())
        return total, dict(ctx.terms), weights
