"""Sinkhorn-Knopp teacher targets (DINOv3's "centering"), balanced over the rows of all ranks.

Dims: N rows on this rank (N_tot over all ranks; N may differ between ranks), K prototypes.

The reference procedure (DINOv3 ``SinkhornKnoppTeacher``), on Q = exp(L / T)^T of shape [K, N_tot]:

    Q <- Q / sum(Q)
    repeat n_iterations:
        Q[k, :] <- Q[k, :] / sum_n Q[k, n] / K          (rows: global sums over all ranks)
        Q[:, n] <- Q[:, n] / sum_k Q[k, n] / N_tot      (columns: one sample each, local)
    probs = (N_tot * Q)^T                                 -> [N, K], rows sum to 1

Each step rescales by positive factors, so it is carried out here on log Q with log-sum-exp
normalisations. The result is the reference's (in exact arithmetic) without its failure modes:
exp(L/T) overflows fp32 once L/T > 88, and a max-shifted exp can still underflow a whole prototype
row or sample column to 0 and give 0/0. The global factors 1/sum(Q), 1/K and 1/N_tot are cancelled
by the normalisation that follows each of them (and N_tot by the final product), so they are
dropped: each iteration is one global log-sum-exp over the rows of all ranks (an all-reduce MAX
and an all-reduce SUM of [K] vectors) and one local log-sum-exp per row.
"""

from __future__ import annotations

import torch

from dino_bridge.assign.base import TeacherAssigner
from dino_bridge.distributed import dist


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, teacher_temp: float, *, n_iterations: int = 3) -> torch.Tensor:
    """Balanced teacher targets by Sinkhorn-Knopp over the rows of all ranks.

    Args:
        logits: [N, K] teacher head logits on this rank (any float dtype; computed in fp32).
            N may differ between ranks, and may be 0.
        teacher_temp: T > 0.
        n_iterations: Sinkhorn iterations (>= 1), 3 in DINOv3.

    Returns:
        [N, K] fp32 probabilities; each row sums to 1, and over the rows of all ranks each
        prototype's total tends to N_tot / K as ``n_iterations`` grows.

    Every rank must call this the same number of times (it issues 2 * n_iterations all-reduces).
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits [N, K], got {tuple(logits.shape)}")
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    n_rows, n_prototypes = logits.shape
    log_q = logits.float() / teacher_temp  # [N, K] = (log Q)^T up to a constant; a fresh buffer
    scratch = torch.empty_like(log_q)
    for _ in range(n_iterations):
        # Prototypes: divide each column of log_q (a row of Q) by its sum over all ranks' samples.
        if n_rows > 0:
            proto_max = log_q.amax(dim=0)  # [K]
        else:
            proto_max = log_q.new_full((n_prototypes,), float("-inf"))
        dist.all_reduce_(proto_max, op="max")
        proto_sum = torch.sub(log_q, proto_max, out=scratch).exp_().sum(dim=0)  # [K]
        dist.all_reduce_(proto_sum, op="sum")
        log_q.sub_(proto_sum.log_().add_(proto_max))
        # Samples: normalise each row of log_q (a column of Q) locally.
        sample_max = log_q.amax(dim=1, keepdim=True)  # [N, 1]
        sample_sum = torch.sub(log_q, sample_max, out=scratch).exp_().sum(dim=1, keepdim=True)
        log_q.sub_(sample_sum.log_().add_(sample_max))
    return log_q.exp_()


class SinkhornKnopp(TeacherAssigner):
    """Stateless Sinkhorn-Knopp assigner: ``forward(logits [N, K], teacher_temp) -> probs [N, K]``."""

    def __init__(self, n_iterations: int = 3) -> None:
        super().__init__()
        if n_iterations < 1:
            raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
        self.n_iterations = n_iterations

    def forward(self, logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return sinkhorn_knopp(logits, teacher_temp, n_iterations=self.n_iterations)

    def extra_repr(self) -> str:
        return f"n_iterations={self.n_iterations}"
