"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO protocol).

Legend: Q query (test) rows, N train rows, D width, C classes, k neighbours.
For each query, the k most similar train features (cosine similarity s) vote for their class with
weight exp(s / T), T = 0.07; the predicted class is the one with the largest summed weight.
Similarities are computed in chunks (queries × train) with a running top-k, so memory stays
bounded by ``query_chunk × train_chunk`` whatever N is.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("dino_bridge")

DEFAULT_KS = (10, 20, 100, 200)


def topk_neighbours(
    queries: torch.Tensor, train: torch.Tensor, k: int, train_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [Q,k], indices [Q,k]) of the k most similar train rows, by a running top-k."""
    k = min(k, train.shape[0])
    best_sims = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_idx = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, train.shape[0], train_chunk):
        sims = queries @ train[start : start + train_chunk].T
        sims, idx = sims.topk(min(k, sims.shape[1]), dim=1)
        best_sims = torch.cat([best_sims, sims], dim=1)
        best_idx = torch.cat([best_idx, idx + start], dim=1)
        best_sims, order = best_sims.topk(min(k, best_sims.shape[1]), dim=1)
        best_idx = best_idx.gather(1, order)
    return best_sims, best_idx


def knn_predict_scores(
    neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, k: int, temperature: float
) -> torch.Tensor:
    """Class scores [Q,C] from the first k neighbours (sorted by decreasing similarity)."""
    weights = (neighbour_sims[:, :k] / temperature).exp()
    scores = torch.zeros(neighbour_sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    query_chunk: int = 1024,
    train_chunk: int = 65536,
    normalize: bool = True,
) -> dict[int, float]:
    """Top-1 accuracy (in %) for each k; k larger than the train set is clipped to its size."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("kNN needs at least one train and one test feature")
    if normalize:
        train_features = torch.nn.functional.normalize(train_features.float(), dim=1)
        test_features = torch.nn.functional.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    n_train = train_features.shape[0]
    for k in ks:
        if k > n_train:
            logger.warning("kNN: k=%d is larger than the %d train images; using k=%d", k, n_train, n_train)
    max_k = min(max(ks), n_train)
    correct = dict.fromkeys(ks, 0)
    for start in range(0, test_features.shape[0], query_chunk):
        queries = test_features[start : start + query_chunk]
        truth = test_labels[start : start + query_chunk]
        sims, idx = topk_neighbours(queries, train_features, max_k, train_chunk)
        labels = train_labels[idx]
        for k in ks:
            predicted = knn_predict_scores(sims, labels, num_classes, min(k, max_k), temperature).argmax(1)
            correct[k] += int((predicted == truth).sum())
    return {k: 100.0 * correct[k] / test_features.shape[0] for k in ks}


@torch.no_grad()
def knn_top_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
    tops: tuple[int, ...] = (1, 5),
    query_chunk: int = 1024,
    train_chunk: int = 65536,
) -> dict[int, float]:
    """Top-t accuracy (in %) of the k-NN vote for each t in ``tops``: a query counts as correct when
    its class is among the t classes with the largest summed weight (t clipped to C classes; k to N).
    Features must be L2-normalised rows; labels index ``num_classes`` classes."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("kNN needs at least one train and one test feature")
    k = min(k, train_features.shape[0])
    correct = dict.fromkeys(tops, 0)
    for start in range(0, test_features.shape[0], query_chunk):
        queries = test_features[start : start + query_chunk]
        truth = test_labels[start : start + query_chunk]
        sims, idx = topk_neighbours(queries, train_features, k, train_chunk)
        scores = knn_predict_scores(sims, train_labels[idx], num_classes, k, temperature)
        ranked = scores.topk(min(max(tops), num_classes), dim=1).indices  # [Q, t] best class first
        hits = ranked == truth[:, None]
        for t in tops:
            correct[t] += int(hits[:, :t].any(dim=1).sum())
    return {t: 100.0 * correct[t] / test_features.shape[0] for t in tops}
