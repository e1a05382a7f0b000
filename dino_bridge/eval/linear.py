"""The linear probe: multinomial logistic regression on frozen features, its L2 strength chosen on
a held-out part of the TRAINING set. Pure functions of tensors; the command is ``run_linear.py``.

Legend: N rows (images), F feature width, C classes, λ the L2 strength, z standardised features.

Objective, over W [F, C] and b [C], with z = (x − μ) / σ (μ, σ of the rows being fitted):

    L(W, b) = (1/N) Σ_i −log softmax(z_i W + b)[y_i] + (λ/2) ‖W‖²        (b is not penalised)

which is scikit-learn's ``LogisticRegression(C)`` objective divided by C·N: λ = 1 / (C·N).

Fit: full-batch L-BFGS (strong Wolfe line search) from zeros or a warm start. The problem is convex,
so there is no learning rate or epoch count to tune and the only hyperparameter is λ. Loss and
gradient are accumulated over chunks of ``chunk_rows`` rows (gradient by hand, no autograd graph),
so the memory beyond the features is O(chunk_rows · (F + C)) whatever N is. The fit runs on
``device``; the features may stay elsewhere (each chunk is copied over), so features that do not
fit in GPU memory can stay on the CPU at the cost of a copy per pass. One L-BFGS function
evaluation costs 2·N·F·C multiply-adds (the logits and rᵀx): for ImageNet-1k with ViT-L's
CLS+avgpool (N = 1.28 M, F = 2048, C = 1000, 10 GiB of fp32 features) about 10 TFLOP, a fifth of a
second at 50 TFLOP/s; a fit of at most 500 iterations is then under 2 minutes, and the sweep
(warm-started, stopped early by ``patience``) plus the refit well under 20 (an estimate from the
FLOP count, not a measurement). On a CPU, a Fashion-MNIST-sized set (60 000 × 384, 10 classes)
costs about 0.5 G multiply-adds per evaluation.

Choice of λ (``choose_l2``): a seeded, class-stratified split of the training rows holds out
``holdout_fraction`` of them; for each λ of the grid, strongest first (each fit warm-started from
the previous one), fit the rest and score top-1 on the held-out rows. The best λ (ties: the
stronger) is refit on every training row (``linear_probe``). Test labels are read only to score
the final model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("dino_bridge")

DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
DEFAULT_CHUNK_ROWS = 32768


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: scores = ((x − mean) / std) @ weight + bias."""

    weight: torch.Tensor  # [F, C]
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [F]
    std: torch.Tensor  # [F]
    l2: float
    iterations: int = 0  # L-BFGS iterations of the last fit


def _chunks(n: int, chunk_rows: int):
    for start in range(0, n, chunk_rows):
        yield start, min(start + chunk_rows, n)


def _take(tensor: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int, device) -> torch.Tensor:
    """Rows [start, stop) of ``tensor`` (or of ``tensor[rows]``), on ``device``."""
    if rows is None:
        return tensor[start:stop].to(device, non_blocking=True)
    return tensor[rows[start:stop].to(tensor.device)].to(device, non_blocking=True)


def feature_stats(
    features: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [F], std [F]) of ``features`` (or of its ``rows``), in fp64 sums; a constant feature
    gets std 1 (it standardises to 0)."""
    device = features.device if device is None else torch.device(device)
    n = features.shape[0] if rows is None else rows.numel()
    if n == 0:
        raise ValueError("the linear probe needs at least one training feature")
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    for start, stop in _chunks(n, chunk_rows):
        x = _take(features, rows, start, stop, device).double()
        total += x.sum(0)
        squares += x.square().sum(0)
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    return mean.float(), std.float()


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows): ``fraction`` of each class held out (a class of one row stays in
    the fit part), chosen by a permutation seeded with ``seed``; both sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    held = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        held.append(members[: int(round(fraction * len(members))) if len(members) > 1 else 0])
    held = np.sort(np.concatenate(held))
    if held.size == 0:
        raise ValueError(f"no training row can be held out to choose the L2 strength ({len(y)} rows)")
    fit = np.setdiff1d(np.arange(len(y)), held)
    return torch.from_numpy(fit), torch.from_numpy(held)


def _loss_and_gradients(probe_params, features, labels, rows, l2, stats, chunk_rows, device):
    """L(W, b) and (∂L/∂W, ∂L/∂b), accumulated over row chunks.

    The standardisation is folded into the weights (z W + b = x (W/σ) + b − (μ/σ) W, and
    ∂L/∂W = (xᵀr − μ ⊗ Σr) / σ for the logit residuals r), so no standardised copy is made."""
    weight, bias = probe_params
    mean, std = stats
    scaled = weight / std[:, None]  # [F, C]
    shift = bias - mean @ scaled  # [C]
    n = features.shape[0] if rows is None else rows.numel()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    grad_x = weight.new_zeros(weight.shape[1], weight.shape[0])  # (xᵀr)ᵀ [C, F]
    grad_b = torch.zeros_like(bias)
    for start, stop in _chunks(n, chunk_rows):
        x = _take(features, rows, start, stop, device).float()
        y = _take(labels, rows, start, stop, device)
        log_p = torch.log_softmax(torch.addmm(shift, x, scaled), dim=1)  # [n, C]
        loss -= log_p.gather(1, y[:, None]).sum().double()
        residual = log_p.exp_()  # softmax − one-hot: the gradient of the summed CE w.r.t. logits
        residual[torch.arange(y.numel(), device=device), y] -= 1.0
        grad_x.addmm_(residual.T, x)  # rᵀx: a CPU GEMM far faster than xᵀr with x row-major
        grad_b += residual.sum(0)
    grad_w = (grad_x.T - mean[:, None] * grad_b[None, :]) / std[:, None]
    loss = loss / n + 0.5 * l2 * weight.double().square().sum()
    return loss.float(), (grad_w / n + l2 * weight).contiguous(), grad_b / n


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    rows: torch.Tensor | None = None,
    init: LinearProbe | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
    tolerance: float = 1e-6,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: torch.device | str | None = None,
) -> LinearProbe:
    """Minimise L(W, b) over ``features[rows]`` [N, F] with labels in [0, C) by L-BFGS.

    Stops when the largest gradient entry is below ``tolerance`` or after ``max_iter`` iterations.
    ``init``: a probe to start from (warm start); ``stats``: (mean, std) to standardise with
    (default: those of the rows fitted).
    """
    if l2 <= 0:
        raise ValueError(f"the L2 strength must be > 0, got {l2}")
    low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    if not 0 <= low <= high < num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {low}..{high}")
    device = features.device if device is None else torch.device(device)
    if stats is None:
        stats = feature_stats(features, rows, chunk_rows=chunk_rows, device=device)
    stats = tuple(s.to(device) for s in stats)
    width = features.shape[1]
    if init is None:
        weight = torch.zeros(width, num_classes, device=device)
        bias = torch.zeros(num_classes, device=device)
    else:
        weight, bias = init.weight.to(device).clone(), init.bias.to(device).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tolerance,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        with torch.no_grad():
            loss, weight.grad, bias.grad = _loss_and_gradients(
                (weight, bias), features, labels, rows, l2, stats, chunk_rows, device
            )
        return loss

    optimizer.step(closure)
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LinearProbe(weight.detach(), bias.detach(), stats[0], stats[1], float(l2), iterations)


def _scores(probe: LinearProbe, x: torch.Tensor) -> torch.Tensor:
    scaled = probe.weight / probe.std[:, None]
    return torch.addmm(probe.bias - probe.mean @ scaled, x.float(), scaled)


@torch.no_grad()
def probe_scores(
    probe: LinearProbe,
    features: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Class scores [N, C] of ``features`` [N, F] (or of its ``rows``), on the probe's device."""
    device = probe.weight.device
    n = features.shape[0] if rows is None else rows.numel()
    out = [_scores(probe, _take(features, rows, a, b, device)) for a, b in _chunks(n, chunk_rows)]
    return torch.cat(out) if out else probe.weight.new_zeros(0, probe.weight.shape[1])


@torch.no_grad()
def topk_accuracy(
    probe: LinearProbe,
    features: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    rows: torch.Tensor | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[int, float]:
    """Top-k accuracy (%) of ``features`` (or of its ``rows``) for each k (k >= C: every row)."""
    n = features.shape[0] if rows is None else rows.numel()
    if n == 0:
        raise ValueError("no features to score the linear probe on")
    device = probe.weight.device
    top = min(max(ks), probe.weight.shape[1])
    correct = dict.fromkeys(ks, 0)
    for a, b in _chunks(n, chunk_rows):
        ranked = _scores(probe, _take(features, rows, a, b, device)).topk(top, dim=1).indices
        hits = ranked == _take(labels, rows, a, b, device)[:, None]
        for k in ks:
            correct[k] += int(hits[:, :k].any(1).sum())
    return {k: 100.0 * correct[k] / n for k in ks}


def check_probe_settings(
    grid: Sequence[float], holdout_fraction: float, max_iter: int, patience: int | None = None
) -> None:
    """A ValueError naming a bad setting (called before hours of feature extraction, not after)."""
    if not grid or any(not l2 > 0 for l2 in grid):
        raise ValueError(f"the L2 grid must be a non-empty list of positive strengths, got {list(grid)}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")


def choose_l2(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    patience: int | None = 2,
    max_iter: int = 500,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: torch.device | str | None = None,
) -> tuple[float, dict[float, float], LinearProbe]:
    """(best λ, held-out top-1 per λ tried, the best λ's probe fitted on the non-held-out rows).

    Only the training ``features`` [N, F] / ``labels`` [N] are seen. The grid is swept from the
    strongest λ; with ``patience`` p, the sweep stops after p strengths in a row that do not beat
    the best so far (held-out accuracy against λ is unimodal in practice, and the weakest
    strengths are the slowest fits). ``patience=None`` tries every λ."""
    check_probe_settings(grid, holdout_fraction, max_iter, patience)
    device = features.device if device is None else torch.device(device)
    fit_rows, held_rows = holdout_split(labels, holdout_fraction, seed)
    stats = feature_stats(features, fit_rows, chunk_rows=chunk_rows, device=device)
    scores, best, previous, worse = {}, None, None, 0
    for l2 in sorted(set(grid), reverse=True):  # strongest first: each fit warm-starts the next
        previous = fit_logistic(
            features, labels, num_classes, l2, rows=fit_rows, init=previous, stats=stats,
            max_iter=max_iter, chunk_rows=chunk_rows, device=device,
        )  # fmt: skip
        scores[l2] = topk_accuracy(previous, features, labels, (1,), held_rows, chunk_rows=chunk_rows)[1]
        logger.info("linear probe: l2=%g held-out top-1 %.2f%% (%d L-BFGS iterations)",
                    l2, scores[l2], previous.iterations)  # fmt: skip
        if best is None or scores[l2] > scores[best.l2]:  # strict: a tie keeps the stronger λ
            best, worse = previous, 0
        else:
            worse += 1
            if patience is not None and worse >= patience:
                break
    return best.l2, scores, best


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    patience: int | None = 2,
    max_iter: int = 500,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: torch.device | str | None = None,
) -> tuple[dict, LinearProbe]:
    """Choose λ on the training set (``choose_l2``), refit on all of it, and score top-1 / top-5 (%)
    on the test set. Returns (a JSON-ready result, the final probe)."""
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features are {train_features.shape[1]} wide but test features {test_features.shape[1]}"
        )
    common = dict(max_iter=max_iter, chunk_rows=chunk_rows, device=device)
    l2, held_out, start = choose_l2(
        train_features, train_labels, num_classes, grid, holdout_fraction=holdout_fraction, seed=seed,
        patience=patience, **common,
    )  # fmt: skip
    probe = fit_logistic(train_features, train_labels, num_classes, l2, init=start, **common)
    accuracy = topk_accuracy(probe, test_features, test_labels, (1, 5), chunk_rows=chunk_rows)
    n_train = int(train_features.shape[0])
    result = {
        "top1": accuracy[1],
        "top5": accuracy[5],
        "l2": l2,
        "sklearn_C": 1.0 / (l2 * n_train),
        "heldout_top1": {f"{k:g}": v for k, v in held_out.items()},
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "iterations": probe.iterations,
        "n_train": n_train,
        "n_test": int(test_features.shape[0]),
        "feature_dim": int(train_features.shape[1]),
        "num_classes": num_classes,
    }
    return result, probe
