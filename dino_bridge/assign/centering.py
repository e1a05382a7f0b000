"""Softmax centering teacher targets (DINO / DINOv2), with an EMA centre shared by all ranks.

Dims: N rows on this rank (N_tot over all ranks), K prototypes.

    probs      = softmax((logits - center) / T)                         [N, K]
    batch_mean = sum over the rows of all ranks of logits / N_tot         [1, K]
    center    <- momentum * center + (1 - momentum) * batch_mean

The probabilities use the centre from *before* this batch's update (the DINO order).
"""

from __future__ import annotations

from typing import Any

import torch

from dino_bridge.assign.base import TeacherAssigner
from dino_bridge.distributed import dist


def centered_softmax(logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((logits - center) / T) over K, in fp32.

    Args:
        logits: [N, K] teacher logits (any float dtype).
        center: [1, K] centre.
        teacher_temp: T > 0.

    Returns:
        [N, K] fp32 probabilities.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    return torch.softmax((logits.float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def ema_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """The next centre: momentum * center + (1 - momentum) * (mean of the rows of all ranks).

    Args:
        center: [1, K] current centre.
        logits: [N, K] teacher logits of this rank (N may differ between ranks).
        momentum: in [0, 1].

    Returns:
        [1, K] fp32 new centre (identical on every rank). If no rank has a row, the centre is
        returned unchanged. One all-reduce (the row sum and the row count travel together).
    """
    if logits.dim() != 2 or logits.shape[1] != center.shape[-1]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match center {tuple(center.shape)}")
    count = torch.full((1,), float(logits.shape[0]), dtype=torch.float32, device=logits.device)
    sum_and_count = torch.cat([logits.float().sum(dim=0), count])
    dist.all_reduce_(sum_and_count, op="sum")
    row_sum, n_total = sum_and_count[:-1], sum_and_count[-1]
    batch_mean = (row_sum / n_total.clamp_min(1.0)).unsqueeze(0)  # [1, K]
    updated = center.float() * momentum + batch_mean * (1.0 - momentum)
    return torch.where(n_total > 0, updated, center.float())


class SoftmaxCentering(TeacherAssigner):
    """Softmax of EMA-centred teacher logits; the centre [1, K] is a buffer, equal on all ranks."""

    center: torch.Tensor

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_prototypes = num_prototypes
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    def init_weights(self) -> None:
        """Zero the centre (after building on ``meta`` and ``to_empty``)."""
        with torch.no_grad():
            self.center.zero_()

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        probs = centered_softmax(logits, self.center, teacher_temp)
        self.center.copy_(ema_center(self.center, logits, self.momentum))
        return probs

    def snapshot(self) -> Any:
        return self.center.clone()

    def restore(self, record: Any) -> None:
        with torch.no_grad():
            self.center.copy_(record)

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, momentum={self.momentum}"
