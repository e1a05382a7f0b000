"""Evaluation of frozen backbones: feature extraction and weighted kNN."""

from .features import (
    eval_transform_for,
    extract_features,
    labelled_source,
    load_backbone,
    match_classes,
    random_backbone,
)
from .knn import DEFAULT_KS, knn_accuracy

__all__ = [
    "DEFAULT_KS",
    "eval_transform_for",
    "extract_features",
    "knn_accuracy",
    "labelled_source",
    "load_backbone",
    "match_classes",
    "random_backbone",
]
