"""DTCH-SK math as pure functions (``spec/METHOD.md`` §3); the state lives in ``dtch.py``.

Legend: N rows (teacher outputs of this rank), K prototypes, C window rows (the capacity).

One call of DTCH, with the collective and the window between the steps:

    Y = soft_logits(Z, T, s, c)                  # clamp(Z/(T·s), -30, c), fp32 [N, K]
    E = exp(Y)                                   # [N, K], in place of Y
    S = all_reduce_SUM(Σ_rows E), floored 1e-10  # [K]; pushed into the window (the module does this)
    h = window_history(window)                   # Σ of the window rows, fp64 [K]
    b, rare = boost_factors(h, ...)              # [K]
    log w = balance_log_weights(h, β)            # [K]
    q = balanced_targets_(E, b, log w, γ)        # [N, K], in place of E

The floors are part of the definition (the golden data depends on them) and are named below.
The K-vector math runs in float64 (float32 on devices without it); the N×K work in float32.
"""

from __future__ import annotations

import math

import torch

LOGIT_LOWER = -30.0  # fixed lower clamp of Z/(T·s); the upper one is the ``logit_clamp`` argument
MASS_FLOOR = 1e-10  # floor on a column mass S before it enters the window
HISTORY_FLOOR = 1e-6  # floor on h inside the balance weights (ĥ)
WEIGHT_FLOOR = 1e-25  # floor on the balance weights w
PROB_FLOOR = 1e-25  # floor on P and on the normalisers rowsum(b⊙E) and rowsum(q^γ)


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for the K-vector math, except on devices that lack it (MPS): float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def soft_logits(
    logits: torch.Tensor, teacher_temp: float, temp_scale: float = 1.0, logit_clamp: float = 30.0
) -> torch.Tensor:
    """Soft-space logits ``Y = clamp(Z / (T·s), -30, c)``.

    logits Z [N, K] (any float dtype) -> Y [N, K] float32, always a new tensor (callers may
    overwrite it; ``logits`` is never modified).
    """
    scale = teacher_temp * temp_scale
    if logits.dtype == torch.float32:
        y = logits / scale  # one pass, new tensor
    else:
        y = logits.float().div_(scale)
    return y.clamp_(LOGIT_LOWER, logit_clamp)


def window_history(window: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Cumulative history ``h = Σ_rows window``, summed from scratch in ``dtype``.

    window [C, K] (any float dtype) -> h [K] in ``dtype``. The module computes the same sum by
    blocks of rows (``window_block_rows``), recomputing only the block that changed.
    """
    return window.sum(0, dtype=dtype)


def window_block_rows(capacity: int) -> int:
    """Rows per block of the window, ⌈√C⌉: a call then re-sums one block (≤ ⌈√C⌉ rows) and adds
    ⌈C/⌈√C⌉⌉ block sums, instead of re-summing all C rows (312 at K = 65 536 for the DINO CLS:
    more traffic than the N×K work itself at N = 128, once cast to fp64)."""
    return max(1, math.ceil(math.sqrt(capacity)))


def boost_factors(
    history: torch.Tensor, *, alpha: float, w_max: float, divisor: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boost of rare prototypes and the rarity mask.

    history h [K] -> (b [K], rare [K] bool), in the dtype of ``h``, with μ = mean(h):

        rare_k = h_k < μ / d
        b_k    = clamp(|μ / (h_k + ε_b) − d|^α_b, 1, w_max)  if rare_k  else 1
    """
    mean = history.mean()
    rare = history < mean / divisor
    factors = (mean / (history + eps) - divisor).abs_().pow_(alpha).clamp_(1.0, w_max)
    return torch.where(rare, factors, 1.0), rare


def balance_log_weights(history: torch.Tensor, beta: float) -> torch.Tensor:
    """Log balance weights ``log w`` from the history.

    history h [K] -> log w [K] (dtype of ``h``), with ĥ = max(h, 1e-6):

        β = 1      w_k = 1 / (K·ĥ_k)
        0 < β < 1  w_k = (1 − β)/Σĥ + β/(K·ĥ_k)
        β > 1      w_k = ĥ_k^(−β)
        β ≤ 0      w_k = 1/Σĥ                (uniform: no balancing)

    and w ≥ 1e-25. Computed in log space so that no branch under- or overflows.
    """
    h = history.clamp_min(HISTORY_FLOOR)
    k = h.numel()
    log_h = h.log()
    if beta <= 0:
        log_w = (-h.sum().log()).expand(k).clone()
    elif beta == 1:
        log_w = -(log_h + math.log(k))
    elif beta < 1:
        uniform = math.log1p(-beta) - h.sum().log()
        log_w = torch.logaddexp(uniform.expand(k), math.log(beta) - math.log(k) - log_h)
    else:
        log_w = -beta * log_h
    return log_w.clamp_min_(math.log(WEIGHT_FLOOR))


def balanced_targets_(
    exp_soft: torch.Tensor, boost: torch.Tensor, log_weight: torch.Tensor, exp_power: float = 1.0
) -> torch.Tensor:
    """Targets from the soft exponentials, computed in place of ``exp_soft`` and returned.

    exp_soft E = exp(Y) [N, K] float32 (overwritten), boost b [K], log_weight log w [K],
    exp_power γ -> q [N, K] float32, rows summing to 1:

        P     = (b⊙E) / max(rowsum(b⊙E), 1e-25)
        q_bal = row_softmax(log max(P, 1e-25) + log w) = max(P, 1e-25)⊙w / rowsum(...)
        q     = q_bal^γ / max(rowsum(q_bal^γ), 1e-25)       (skipped when γ = 1)

    Linear space, because every factor is bounded in fp32: E ∈ [e^-30, e^c] with c ≤ 60,
    b ∈ [1, w_max], and w is rescaled by its maximum (a constant factor, which the row
    normalisation removes) so w/max(w) ∈ (0, 1]. Each row keeps at least one entry ≥ 1e-25 (the
    column with the largest weight has P ≥ 1e-25), so no row sum underflows; entries that do
    underflow are below 1e-20 of their row. The per-row factor rowsum(b⊙E) of P is applied to the
    floor instead of to E (it cancels in the normalisation): max(b⊙E, 1e-25·r)⊙w.
    Passes over N×K: 3 in place (×b, floor, ×w), 2 row sums, 1 division; +3 when γ ≠ 1.
    """
    q = exp_soft
    q.mul_(boost.to(q.dtype))
    row_mass = q.sum(1, keepdim=True).clamp_min_(PROB_FLOOR)
    q.clamp_(min=row_mass.mul_(PROB_FLOOR))
    q.mul_((log_weight - log_weight.max()).exp_().to(q.dtype))
    q.div_(q.sum(1, keepdim=True))
    if exp_power != 1.0:
        # Literal, not softmax(γ·log q): the 1e-25 floor on rowsum(q^γ) can bind once
        # K^(1−γ) < 1e-25 (the sum is smallest for a uniform row), i.e. (γ−1)·ln K > 25·ln 10.
        q.pow_(exp_power)
        q.div_(q.sum(1, keepdim=True).clamp_min_(PROB_FLOOR))
    return q
