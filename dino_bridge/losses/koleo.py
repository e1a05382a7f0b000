"""KoLeo: the Kozachenko-Leonenko entropy estimator as a spreading loss, with an optional gate.

Dims: n rows, D width, C chunks.

On L2-normalised fp32 features x_i, with nn(i) the nearest other row by inner product:

    d_i = || x_i - x_nn(i) + eps ||_2          (eps = 1e-8 added to every component, as in
                                                torch.nn.PairwiseDistance: the gradient stays
                                                finite when two rows coincide)
    l_i = -log(d_i + 1e-8)

Without the gate the loss is mean_i(l_i). With the gate,

    g_i  = sigmoid((l_i - threshold) / slope)            (not detached)
    loss = 1/2 * mean_i(g_i l_i) + 1/2 * sum_i(g_i l_i) / max(sum_i g_i, 1)

Fewer than 2 rows give 0 (still part of the graph, so backward works).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

EPS = 1e-8


def _autocast_off(device: torch.device):
    """The nearest-neighbour search must run in fp32: switch off autocast where it exists."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def koleo_per_row(x: torch.Tensor) -> torch.Tensor:
    """l_i = -log(||x_i - x_nn(i) + eps|| + eps) for each row of each group.

    Args:
        x: [..., n, D] features (n >= 2); each [n, D] group is searched separately.

    Returns:
        [..., n] fp32 per-row terms. The neighbour index is chosen without gradient (self excluded
        by a -inf diagonal); the gradient flows through the distance. The search compares inner
        products in fp64 (fp32 on MPS): for features close together, 1 − d²/2 in fp32 is at its
        resolution limit (d ≈ 4e-4 gives 1 − 8e-8), so an fp32 search picked the neighbour by
        rounding, and the result depended on the BLAS thread count.
    """
    assert x.shape[-2] >= 2, "koleo_per_row needs at least 2 rows per group"
    with _autocast_off(x.device):
        feats = F.normalize(x.float(), p=2, dim=-1, eps=EPS)
        with torch.no_grad():
            search = feats.to(torch.float32 if feats.device.type == "mps" else torch.float64)
            dots = search @ search.transpose(-1, -2)  # [..., n, n]
            # -inf, not the reference's -1: with -1 a row whose only neighbour is antipodal
            # (dot = -1) would tie with itself and pick itself.
            dots.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
            nn_index = dots.argmax(dim=-1)  # [..., n]
        neighbours = torch.gather(feats, -2, nn_index.unsqueeze(-1).expand_as(feats))
        distances = (feats - neighbours + EPS).norm(p=2, dim=-1)
        return -torch.log(distances + EPS)


def reduce_koleo(
    per_row: torch.Tensor, *, gate: bool = False, gate_threshold: float = 0.0, gate_slope: float = 0.1
) -> torch.Tensor:
    """Reduce per-row terms l [..., n] over the last dim to [...] (plain or gated mean, see top)."""
    if not gate:
        return per_row.mean(dim=-1)
    weights = torch.sigmoid((per_row - gate_threshold) / gate_slope)
    weighted = weights * per_row
    return 0.5 * weighted.mean(dim=-1) + 0.5 * weighted.sum(dim=-1) / weights.sum(dim=-1).clamp_min(1.0)


def koleo_loss(
    x: torch.Tensor, *, gate: bool = False, gate_threshold: float = 0.0, gate_slope: float = 0.1
) -> torch.Tensor:
    """KoLeo loss of one set of rows.

    Args:
        x: [n, D] features (any float dtype; normalised in fp32).
        gate, gate_threshold, gate_slope: the optional sigmoid gate (see the top of the file).

    Returns:
        A scalar fp32 tensor; 0 (attached to ``x``'s graph) when n < 2.
    """
    if x.dim() != 2:
        raise ValueError(f"expected x [n, D], got {tuple(x.shape)}")
    if x.shape[0] < 2:
        return x[:0].float().sum()  # exactly 0, and backward reaches x
    return reduce_koleo(koleo_per_row(x), gate=gate, gate_threshold=gate_threshold, gate_slope=gate_slope)


def koleo_loss_chunked(
    x: torch.Tensor,
    chunk_size: int,
    *,
    generator: torch.Generator | None = None,
    gate: bool = False,
    gate_threshold: float = 0.0,
    gate_slope: float = 0.1,
) -> torch.Tensor:
    """Mean KoLeo loss over random chunks of rows (for the many patch tokens of a batch).

    The rows are shuffled (``torch.randperm`` with ``generator``, else the global RNG of the
    generator's/``x``'s device), cut into floor(n / chunk_size) chunks of ``chunk_size`` rows (the
    remainder is dropped), and the per-chunk losses are averaged. With n <= chunk_size the whole
    set is one chunk (no shuffle: the loss does not depend on the row order).

    Args:
        x: [n, D] features.
        chunk_size: rows per chunk, >= 2.

    Returns:
        A scalar fp32 tensor.
    """
    if x.dim() != 2:
        raise ValueError(f"expected x [n, D], got {tuple(x.shape)}")
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2 (a nearest neighbour needs two rows), got {chunk_size}")
    n_rows, width = x.shape
    if n_rows <= chunk_size:
        return koleo_loss(x, gate=gate, gate_threshold=gate_threshold, gate_slope=gate_slope)
    perm_device = generator.device if generator is not None else x.device
    perm = torch.randperm(n_rows, generator=generator, device=perm_device)
    n_chunks = n_rows // chunk_size
    index = perm[: n_chunks * chunk_size].to(x.device)
    chunks = x[index].view(n_chunks, chunk_size, width)  # [C, chunk_size, D]
    per_chunk = reduce_koleo(
        koleo_per_row(chunks), gate=gate, gate_threshold=gate_threshold, gate_slope=gate_slope
    )
    return per_chunk.mean()
