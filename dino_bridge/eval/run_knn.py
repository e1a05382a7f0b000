"""``dino-bridge eval knn``: kNN accuracy of a checkpoint's frozen backbone on labelled images."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .eval_args import add_labelled_eval_arguments, load_for_eval
from .features import LabelledFeatures, labelled_features
from .knn import DEFAULT_KS, knn_accuracy

logger = logging.getLogger("dino_bridge")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_labelled_eval_arguments(p)
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--output", default=None, help="also write the results as JSON here")


def knn_eval(
    model: nn.Module,
    spec: dict,
    train: str,
    val: str,
    *,
    ks=DEFAULT_KS,
    temperature: float = 0.07,
    limit_train: int | None = None,
    limit_val: int | None = None,
    image_size: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    data = labelled_features(
        model, spec, train, val, limit_train=limit_train, limit_val=limit_val, image_size=image_size,
        batch_size=batch_size, num_workers=num_workers, device=device,
    )  # fmt: skip
    return knn_summary(data, ks=ks, temperature=temperature)


def knn_summary(data: LabelledFeatures, *, ks=DEFAULT_KS, temperature: float = 0.07) -> dict:
    """The kNN figures of ``data``'s L2-normalised ``cls`` features, JSON-ready."""
    acc = knn_accuracy(
        data.train["cls"], data.train_labels, data.val["cls"], data.val_labels, ks=tuple(ks),
        temperature=temperature,
    )  # fmt: skip
    n_train = int(data.train_labels.shape[0])
    return {
        "top1": {str(k): v for k, v in acc.items()},
        "k_used": {str(k): min(int(k), n_train) for k in ks},
        "n_train": n_train,
        "n_val": int(data.val_labels.shape[0]),
        "n_classes": len(data.classes),
        "n_val_classes": len(set(data.val_labels.tolist())),
        "temperature": temperature,
    }


def main(args: argparse.Namespace) -> int:
    model, spec, reading = load_for_eval(args)
    start = time.perf_counter()
    result = knn_eval(model, spec, args.train, args.val, ks=args.ks, temperature=args.temperature, **reading)
    result.update(checkpoint=spec["checkpoint"], which=args.which, train=args.train, val=args.val)
    sizes = f"{result['n_val']} val / {result['n_train']} train images"
    classes = f"{result['n_classes']} classes ({result['n_val_classes']} in val)"
    print(f"kNN ({args.which} CLS, T={args.temperature}) on {sizes}, {classes}, matched by name:")
    for k, v in result["top1"].items():
        used = result["k_used"][k]
        clamped = f" (k clamped to the {used} train images)" if used < int(k) else ""
        print(f"  {k:>4}-NN top-1: {v:.2f}%{clamped}")
    print(f"  ({time.perf_counter() - start:.1f} s)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0
