"""DINO CLS cross-entropy between student crops and teacher target crops.

Dims: S student crops, T teacher crops, B images (per rank), K prototypes.

Every (student crop s, teacher crop t) pair of the same image is one term:

    loss = -1/n_terms * sum_{s,t,b} sum_k q[t,b,k] * log_softmax(z[s,b] / tau_s)_k

With ``ignore_diagonal`` the pairs s == t (the same global view on both sides) are left out, and
n_terms = B*S*T - B*min(S, T); otherwise n_terms = B*S*T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STUDENT_TEMP = 0.1


def dino_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    student_temp: float = STUDENT_TEMP,
    ignore_diagonal: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy over all (student crop, teacher crop, image) terms.

    Args:
        student_logits: [S, B, K] student head logits (any float dtype; upcast to fp32).
        teacher_probs: [T, B, K] teacher target probabilities (rows sum to 1).
        student_temp: tau_s, the student softmax temperature.
        ignore_diagonal: skip the pairs s == t (s, t < min(S, T)).

    Returns:
        A scalar fp32 tensor, -sum_{s,t,b} q[t,b] . log_softmax(z[s,b]/tau_s) / n_terms.

    The double sum over crops factorises, sum_{s,t} q[t] . l[s] = (sum_t q[t]) . (sum_s l[s]), so no
    [S, T, B, K] tensor (and no matmul, which autocast would run in low precision) is formed; the
    diagonal pairs are subtracted afterwards.
    """
    if student_logits.dim() != 3 or teacher_probs.dim() != 3:
        raise ValueError(
            f"expected student [S, B, K] and teacher [T, B, K], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_probs.shape)} "
            "disagree on [B, K]"
        )
    n_diagonal = min(n_student, n_teacher) if ignore_diagonal else 0
    n_terms = batch * (n_student * n_teacher - n_diagonal)
    if n_terms == 0:
        raise ValueError(
            f"no (student, teacher) pairs: S={n_student}, T={n_teacher}, B={batch}, "
            f"ignore_diagonal={ignore_diagonal}"
        )

    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [S, B, K]
    targets = teacher_probs.float()  # [T, B, K]
    total = (log_probs.sum(dim=0) * targets.sum(dim=0)).sum()
    if n_diagonal:
        total = total - (log_probs[:n_diagonal] * targets[:n_diagonal]).sum()
    return -total / n_terms


def dino_loss_weights(n_global: int, n_local: int, ignore_diagonal: bool) -> tuple[float, float]:
    """Weights (local_scale, global_scale) of the local and global DINO terms, by term count.

    local terms = n_global * n_local (each local student crop against each global teacher crop);
    global terms = n_global * (n_global - 1) with the diagonal ignored, else n_global**2.
    Each scale is its count over the total, so local_scale * l_local + global_scale * l_global is
    the mean over every (student crop, teacher crop) pair: (16/18, 2/18) for 2 globals and 8 locals.
    """
    if n_global < 1 or n_local < 0:
        raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global} and {n_local}")
    global_terms = n_global * (n_global - 1) if ignore_diagonal else n_global * n_global
    local_terms = n_global * n_local
    total = global_terms + local_terms
    if total == 0:
        raise ValueError(
            f"no DINO terms with n_global={n_global}, n_local={n_local}, ignore_diagonal={ignore_diagonal}"
        )
    return local_terms / total, global_terms / total
