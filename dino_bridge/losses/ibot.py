"""iBOT masked-patch cross-entropy.

Dims: M masked patch tokens (of all global crops of the rank, flattened), K prototypes.

    loss = -1/n_images * sum_m w_m * sum_k q[m,k] * log_softmax(z[m] / tau_s)_k

w_m = 1 / (number of masked patches in the image of token m), so each masked image contributes the
mean cross-entropy of its tokens. n_images counts every global-crop image of the rank, unmasked
ones included (they contribute 0): the loss is the mean over masked images times the masked
fraction, as in DINOv3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dino_bridge.losses.dino import STUDENT_TEMP


def ibot_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks_weight: torch.Tensor,
    n_images: int,
    *,
    student_temp: float = STUDENT_TEMP,
) -> torch.Tensor:
    """Per-image weighted cross-entropy of masked patch tokens.

    Args:
        student_logits: [M, K] student iBOT-head logits at the masked positions.
        teacher_probs: [M, K] teacher target probabilities at the same positions.
        masks_weight: [M] weight of each token, 1 / (masked tokens in its image).
        n_images: number of global-crop images on this rank, masked or not.
        student_temp: tau_s, the student softmax temperature.

    Returns:
        A scalar fp32 tensor, -sum_m w_m * q[m] . log_softmax(z[m]/tau_s) / n_images. With M = 0
        it is exactly 0 and still part of the graph of ``student_logits`` (backward works).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"expected student and teacher [M, K], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    if masks_weight.shape != student_logits.shape[:1]:
        raise ValueError(
            f"masks_weight has shape {tuple(masks_weight.shape)}, expected [{student_logits.shape[0]}]"
        )
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [M, K]
    per_token = (teacher_probs.float() * log_probs).sum(dim=-1)  # [M]
    return -(per_token * masks_weight.float()).sum() / n_images
