"""``dino-bridge eval knn``: kNN accuracy of a checkpoint's frozen backbone on labelled images."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..distributed.device import detect_device_type
from .features import (
    eval_transform_for,
    extract_features,
    labelled_source,
    load_backbone,
    match_classes,
    subset_indices,
)
from .knn import DEFAULT_KS, knn_accuracy

logger = logging.getLogger("dino_bridge")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, its ckpt/ folder, or a run dir")
    p.add_argument("--train", required=True, help="labelled train images: an image folder or a demo name")
    p.add_argument("--val", required=True, help="labelled val images: an image folder or a demo name")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")
    p.add_argument(
        "--image-size", type=int, default=None, help="eval crop size (default: the global crop size)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument(
        "--limit-train", type=int, default=None, help="use a seeded subset of this many train images"
    )
    p.add_argument("--limit-val", type=int, default=None, help="use a seeded subset of this many val images")
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--device", default="auto")
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
    transform = eval_transform_for(spec, image_size)
    train_source = labelled_source(train, "train")
    val_source = match_classes(train_source, labelled_source(val, "test"))  # by name, not position
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device)
    train_feats, train_labels = extract_features(
        model, train_source, transform, indices=subset_indices(len(train_source), limit_train), **common
    )
    val_feats, val_labels = extract_features(
        model, val_source, transform, indices=subset_indices(len(val_source), limit_val, seed=1), **common
    )
    unseen = sorted(set(val_labels.tolist()) - set(train_labels.tolist()))
    if unseen:  # the class exists in the train folder, not in its subset: it cannot be predicted
        names = ", ".join(repr(train_source.classes[i]) for i in unseen)
        logger.warning("kNN: no train image of val class(es) %s in the train subset used", names)
    acc = knn_accuracy(
        train_feats, train_labels, val_feats, val_labels, ks=tuple(ks), temperature=temperature
    )
    n_train = int(train_feats.shape[0])
    return {
        "top1": {str(k): v for k, v in acc.items()},
        "k_used": {str(k): min(int(k), n_train) for k in ks},
        "n_train": n_train,
        "n_val": int(val_feats.shape[0]),
        "n_classes": len(train_source.classes),
        "n_val_classes": len(set(val_labels.tolist())),
        "temperature": temperature,
    }


def main(args: argparse.Namespace) -> int:
    device, _ = detect_device_type(args.device)
    model, spec = load_backbone(args.checkpoint, args.which)
    start = time.perf_counter()
    result = knn_eval(
        model,
        spec,
        args.train,
        args.val,
        ks=args.ks,
        temperature=args.temperature,
        limit_train=args.limit_train,
        limit_val=args.limit_val,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
    )
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
