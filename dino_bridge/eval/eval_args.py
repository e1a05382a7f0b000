"""What ``dino-bridge eval knn`` and ``eval linear`` share: the checkpoint and labelled images they
read, the arguments that name them, and loading the backbone (the CLI layer; the library functions
take these as plain keyword arguments)."""

from __future__ import annotations

import argparse

from torch import nn

from ..distributed.device import detect_device_type
from .features import load_backbone


def add_labelled_eval_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint/--which, --train/--val and how their images are read (sizes, subsets, device)."""
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
    p.add_argument("--device", default="auto")


def load_for_eval(args: argparse.Namespace) -> tuple[nn.Module, dict, dict]:
    """(backbone, its spec, the keyword arguments of ``labelled_features`` that the arguments set)."""
    device, _ = detect_device_type(args.device)
    model, spec = load_backbone(args.checkpoint, args.which)
    reading = {
        "limit_train": args.limit_train,
        "limit_val": args.limit_val,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": device,
    }
    return model, spec, reading
