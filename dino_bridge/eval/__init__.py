"""Evaluation of frozen backbones: feature extraction, weighted kNN and the linear probe."""

from .features import (
    LabelledFeatures,
    eval_transform_for,
    extract_feature_sets,
    extract_features,
    labelled_features,
    labelled_source,
    load_backbone,
    match_classes,
    random_backbone,
)
from .knn import DEFAULT_KS, knn_accuracy
from .linear import DEFAULT_L2_GRID, LinearProbe, choose_l2, fit_logistic, linear_probe, topk_accuracy

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_L2_GRID",
    "LabelledFeatures",
    "LinearProbe",
    "choose_l2",
    "eval_transform_for",
    "extract_feature_sets",
    "extract_features",
    "fit_logistic",
    "knn_accuracy",
    "labelled_features",
    "labelled_source",
    "linear_probe",
    "load_backbone",
    "match_classes",
    "random_backbone",
    "topk_accuracy",
]
