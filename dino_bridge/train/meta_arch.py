"""One SSL step's model side: teacher targets → student outputs → loss terms.

Legend: B images per rank, n_l local crops per image, P patches per global crop, M masked
patches in the batch, K prototypes, D width. Global crops are crop-major: rows [0, B) are every
image's first global crop, rows [B, 2B) the second.

The student and the teacher are ``nn.ModuleDict``s with ``backbone``, ``dino_head`` and (when
``ibot.separate_head``) ``ibot_head``; the teacher runs in eval mode without gradients.
Teacher-target strategies (assigners) are passed in, one for the DINO CLS targets and one for the
iBOT patch targets, so a new strategy never touches this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..losses import dino_cross_entropy, dino_loss_weights, ibot_cross_entropy, koleo_loss, koleo_loss_chunked

LOSS_TERMS = (
    "dino_local_crops_loss",
    "dino_global_crops_loss",
    "ibot_loss",
    "koleo_loss_cls",
    "koleo_loss_patch",
)


@dataclass(frozen=True)
class SSLLossSettings:
    """Plain values the losses need (the trainer fills them from the config)."""

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

    def term_weights(self) -> dict[str, float]:
        """The weight of each loss term in the total (logged next to the unweighted terms)."""
        local_scale, global_scale = dino_loss_weights(
            self.n_global_crops, self.n_local_crops, self.global_ignore_diagonal
        )
        return {
            "dino_local_crops_loss": self.dino_weight * local_scale,
            "dino_global_crops_loss": self.dino_weight * global_scale,
            "ibot_loss": self.ibot_weight,
            "koleo_loss_cls": self.koleo_cls_weight,
            "koleo_loss_patch": self.koleo_patch_weight,
        }


class SSLMetaArch(nn.Module):
    """DINO CLS + iBOT masked-patch + KoLeo (CLS and patch) on a student and its EMA teacher."""

    def __init__(
        self,
        student: nn.ModuleDict,
        teacher: nn.ModuleDict,
        dino_assigner: nn.Module,
        ibot_assigner: nn.Module,
        settings: SSLLossSettings,
    ):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.assigners = nn.ModuleDict({"dino_cls": dino_assigner, "ibot_patch": ibot_assigner})
        self.settings = settings
        self.weights = settings.term_weights()
        self.teacher.requires_grad_(False)

    def ibot_head(self, models: nn.ModuleDict) -> nn.Module:
        return models["ibot_head"] if "ibot_head" in models else models["dino_head"]

    @property
    def ibot_active(self) -> bool:
        return self.weights["ibot_loss"] > 0

    # ------------------------------------------------------------------ teacher targets
    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        """DINO targets [2, B, K] from the global crops' CLS; iBOT targets [M, K] at the masked positions."""
        self.teacher.eval()
        global_crops = batch["global_crops"]
        two_b = global_crops.shape[0]
        out = self.teacher["backbone"].forward_features(global_crops)
        cls_logits = self.teacher["dino_head"](out["x_norm_clstoken"])
        dino_probs = self.assigners["dino_cls"](cls_logits, teacher_temp)
        targets = {"dino": dino_probs.reshape(self.settings.n_global_crops, two_b // 2, -1)}
        if self.ibot_active:
            patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
            patch_logits = self.ibot_head(self.teacher)(patches)
            targets["ibot"] = self.assigners["ibot_patch"](patch_logits, teacher_temp)
        return targets

    # ------------------------------------------------------------------ student outputs
    def student_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        global_crops, local_crops = batch["global_crops"], batch.get("local_crops")
        crops, masks, local = [global_crops], [batch["masks"] if self.settings.apply_masks else None], [False]
        if local_crops is not None and local_crops.shape[0] > 0:
            crops.append(local_crops)
            masks.append(None)
            local.append(True)
        outs = self.student["backbone"].forward_features(crops, masks=masks, local_crops=local)
        global_out = outs[0]
        two_b = global_crops.shape[0]
        cls = [o["x_norm_clstoken"] for o in outs]
        logits = self.student["dino_head"](torch.cat(cls))
        result = {
            "global_cls": global_out["x_norm_clstoken"],
            "global_patches": global_out["x_norm_patchtokens"],
            "dino_global_logits": logits[:two_b].reshape(self.settings.n_global_crops, two_b // 2, -1),
            "dino_local_logits": logits[two_b:].reshape(-1, two_b // 2, logits.shape[-1]),
        }
        if self.ibot_active:
            patches = global_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
            result["ibot_logits"] = self.ibot_head(self.student)(patches)
        return result

    # ------------------------------------------------------------------ losses
    def compute_losses(self, student: dict, targets: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """Total loss and the unweighted terms (names as in the reference's logs)."""
        s = self.settings
        dino_targets = targets["dino"]
        terms: dict[str, torch.Tensor] = {}
        zero = student["dino_global_logits"].sum() * 0.0
        if student["dino_local_logits"].shape[0] > 0:
            terms["dino_local_crops_loss"] = dino_cross_entropy(
                student["dino_local_logits"], dino_targets, student_temp=s.student_temp
            )
        else:
            terms["dino_local_crops_loss"] = zero
        terms["dino_global_crops_loss"] = dino_cross_entropy(
            student["dino_global_logits"],
            dino_targets,
            student_temp=s.student_temp,
            ignore_diagonal=s.global_ignore_diagonal,
        )
        if self.ibot_active:
            terms["ibot_loss"] = ibot_cross_entropy(
                student["ibot_logits"],
                targets["ibot"],
                batch["masks_weight"],
                n_images=batch["global_crops"].shape[0],
                student_temp=s.student_temp,
            )
        else:
            terms["ibot_loss"] = zero
        terms["koleo_loss_cls"] = self._koleo_cls(student["global_cls"]) if s.koleo_cls_weight > 0 else zero
        terms["koleo_loss_patch"] = (
            self._koleo_patch(student["global_patches"], batch) if s.koleo_patch_weight > 0 else zero
        )
        total = sum(self.weights[name] * terms[name] for name in LOSS_TERMS)
        return total, terms

    def _koleo_cls(self, global_cls: torch.Tensor) -> torch.Tensor:
        """KoLeo on the pre-head CLS of each global crop separately, averaged over crops."""
        s = self.settings
        per_crop = global_cls.float().chunk(s.n_global_crops)
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

    def _koleo_patch(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        """KoLeo on the unmasked global patch tokens, shuffled, in chunks of 2B rows."""
        s = self.settings
        tokens = patches.float().flatten(0, 1)
        if self.settings.apply_masks:
            tokens = tokens[~batch["masks"].flatten()]
        return koleo_loss_chunked(
            tokens,
            chunk_size=patches.shape[0],
            gate=s.koleo_patch_gate,
            gate_threshold=s.koleo_patch_gate_threshold,
            gate_slope=s.koleo_gate_slope,
        )
