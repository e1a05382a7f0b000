"""``dino-bridge features``: a backbone's features of an image folder or list, as a .npy; optionally
the PCA picture of the patch features of the first few images.

Writes OUT (float32 [N, D]), OUT's stem + ``.paths.txt`` (row i's image on line i) and + ``.json``
(what was computed, and every unreadable image skipped with its reason)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..distributed.device import detect_device_type
from .features import eval_transform_for
from .image_features import FEATURE_KINDS, embed_images, image_source, load_feature_backbone, pca_picture


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True,
        help="a checkpoint folder, its ckpt/ folder, a run dir, or an exported backbone dir (torch or hf)",
    )  # fmt: skip
    p.add_argument("--images", required=True, help="an image folder (recursive) or a txt list of paths")
    p.add_argument("--out", required=True, help="the features file to write (.npy)")
    p.add_argument(
        "--which", choices=("teacher", "student"), default=None, help="checkpoints only (default teacher)"
    )
    p.add_argument(
        "--kind", choices=FEATURE_KINDS, default="cls",
        help="cls: the final-normed CLS; cls+avgpool: CLS and the mean patch token side by side [2D];"
             " patch-mean: the mean patch token",
    )  # fmt: skip
    p.add_argument("--l2", action=argparse.BooleanOptionalAction, default=True, help="L2-normalise every row")
    p.add_argument(
        "--image-size", type=int, default=None, help="eval crop size (default: the backbone's img_size)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--pca-png", default=None, help="also write the PCA picture of the patch features here")
    p.add_argument("--pca-images", type=int, default=4, help="how many images the PCA picture shows")
    p.add_argument(
        "--pca-foreground", type=float, default=None, metavar="THRESHOLD",
        help="black out patches whose scaled first component is <= THRESHOLD (e.g. 0.5), refit on the rest",
    )  # fmt: skip


def output_files(out: str | Path) -> tuple[Path, Path, Path]:
    """(features .npy, paths .txt, summary .json): ``feats.npy`` → ``feats.paths.txt``, ``feats.json``."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: the features file must end in .npy")
    return out, out.with_suffix(".paths.txt"), out.with_suffix(".json")


def write_paths(paths: list[str], file: Path) -> None:
    bad = next((p for p in paths if "\n" in p or "\r" in p), None)
    if bad is not None:
        raise ValueError(f"image path {bad!r} contains a line break: it cannot be one line of {file}")
    file.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    feats_file, paths_file, summary_file = output_files(args.out)
    if args.pca_png is not None and Path(args.pca_png).suffix.lower() != ".png":
        raise ValueError(f"--pca-png {args.pca_png}: the picture must end in .png")
    if args.pca_images < 1:
        raise ValueError(f"--pca-images {args.pca_images}: at least 1")
    device, _ = detect_device_type(args.device)
    source = image_source(args.images)  # before the backbone: a bad folder fails at once
    model, spec = load_feature_backbone(args.checkpoint, args.which)
    transform = eval_transform_for(spec, args.image_size)
    result = embed_images(
        model, source, transform, kind=args.kind, l2=args.l2, batch_size=args.batch_size,
        num_workers=args.num_workers, device=device, progress=True,
    )  # fmt: skip
    feats_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(feats_file, result.features)
    write_paths(result.paths, paths_file)
    summary = {
        "checkpoint": spec["checkpoint"],
        "which": spec["which"],
        "kind": args.kind,
        "l2_normalised": args.l2,
        "image_size": transform.size,
        "shape": list(result.features.shape),
        "images": str(args.images),
        "skipped": [{"path": p, "reason": why} for p, why in result.skipped],
    }
    for path, why in result.skipped:
        print(f"skipped unreadable image {path}: {why}", file=sys.stderr)
    n, d = result.features.shape
    print(
        f"features ({args.kind}{', L2-normalised' if args.l2 else ''}) of {n} images, [{n}, {d}] float32"
        f" -> {feats_file} (+ {paths_file.name}, {summary_file.name})"
        + (f"; {len(result.skipped)} unreadable image(s) skipped (listed in {summary_file.name})"
           if result.skipped else "")
    )  # fmt: skip
    if args.pca_png is not None:
        picture, shown = pca_picture(
            model, source, transform, count=args.pca_images, foreground_threshold=args.pca_foreground,
            device=device,
        )  # fmt: skip
        Path(args.pca_png).parent.mkdir(parents=True, exist_ok=True)
        picture.save(args.pca_png)
        summary["pca_png"] = {"file": str(args.pca_png), "images": shown, "foreground": args.pca_foreground}
        size = f"{picture.width}x{picture.height}"
        print(f"PCA of the patch features of {len(shown)} images -> {args.pca_png} ({size})")
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return 0
