"""``dino-bridge eval linear``: the linear probe of a checkpoint's frozen backbone on labelled images.

The features (``--features``, ``--blocks``) follow DINOv2's linear evaluation: the final-normed CLS
of each of the last n blocks, concatenated, and with ``cls+avgpool`` the mean of the last block's
patch tokens appended. The default, ``cls+avgpool`` of the last block, is the input of DINOv2's
released linear heads. The classifier and the choice of its L2 strength are ``eval/linear.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .eval_args import add_labelled_eval_arguments, load_for_eval
from .features import Embed, LabelledFeatures, labelled_features
from .linear import DEFAULT_L2_GRID, check_probe_settings, linear_probe

logger = logging.getLogger("dino_bridge")

FEATURES = ("cls", "cls+avgpool")
RESULTS_FILE = "linear_results.json"


def probe_embedding(features: str = "cls+avgpool", blocks: int = 1) -> Embed:
    """An ``embed(model, images)`` for ``extract_feature_sets`` giving {"linear": [B, F], "cls": the
    L2-normalised final CLS [B, D] (the kNN feature, so one pass serves both probes)}.

    F = blocks·D for ``cls``, (blocks + 1)·D for ``cls+avgpool``."""
    if features not in FEATURES:
        raise ValueError(f"unknown linear-probe features {features!r}; valid: {', '.join(FEATURES)}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive number of last blocks, got {blocks!r}")

    def embed(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not hasattr(model, "get_intermediate_layers"):
            raise ValueError(f"the linear probe needs a ViT backbone; {type(model).__name__} has no blocks")
        layers = model.get_intermediate_layers(images, n=blocks, return_class_token=True)
        parts = [cls for _, cls in layers]
        if features == "cls+avgpool":
            parts.append(layers[-1][0].mean(dim=1))
        return {"linear": torch.cat(parts, dim=1), "cls": torch.nn.functional.normalize(layers[-1][1], dim=1)}

    return embed


def _on_device(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The features on the fit's device, or left on the CPU (each chunk copied per pass) when they
    do not fit there."""
    if device.type == "cpu":
        return features
    try:
        return features.to(device)
    except torch.OutOfMemoryError:
        logger.warning(
            "linear probe: %.1f GiB of features do not fit on %s; they stay on the CPU (slower)",
            features.numel() * features.element_size() / 2**30, device,
        )  # fmt: skip
        return features


def linear_summary(
    data: LabelledFeatures,
    key: str = "linear",
    *,
    grid=DEFAULT_L2_GRID,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    device: str | torch.device = "cpu",
) -> dict:
    """The linear probe on ``data``'s ``key`` features: JSON-ready figures (top-1/top-5 in %)."""
    device = torch.device(device)
    train, val = _on_device(data.train[key], device), _on_device(data.val[key], device)
    result, _ = linear_probe(
        train, data.train_labels, val, data.val_labels, len(data.classes), tuple(grid),
        holdout_fraction=holdout_fraction, seed=seed, max_iter=max_iter, device=device,
    )  # fmt: skip
    result.update(
        max_iter=max_iter,
        converged=result["iterations"] < max_iter,
        n_val_classes=len(set(data.val_labels.tolist())),
    )
    return result


def linear_eval(
    model: nn.Module,
    spec: dict,
    train: str,
    val: str,
    *,
    features: str = "cls+avgpool",
    blocks: int = 1,
    grid=DEFAULT_L2_GRID,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    limit_train: int | None = None,
    limit_val: int | None = None,
    image_size: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    embed = probe_embedding(features, blocks)  # the settings are checked before any image is read
    check_probe_settings(tuple(grid), holdout_fraction, max_iter)
    data = labelled_features(
        model, spec, train, val, embed, limit_train=limit_train, limit_val=limit_val, image_size=image_size,
        batch_size=batch_size, num_workers=num_workers, device=device,
    )  # fmt: skip
    result = linear_summary(
        data, grid=grid, holdout_fraction=holdout_fraction, seed=seed, max_iter=max_iter, device=device
    )
    return {"features": features, "blocks": blocks, **result}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_labelled_eval_arguments(p)
    p.add_argument("--features", choices=FEATURES, default="cls+avgpool",
                   help="the CLS of each block used, or also the last block's mean patch token")  # fmt: skip
    p.add_argument("--blocks", type=int, choices=(1, 4), default=1, help="use the last 1 or 4 blocks")
    p.add_argument("--l2-grid", type=float, nargs="+", default=list(DEFAULT_L2_GRID),
                   help="L2 strengths to choose from (on a held-out part of the train images)")  # fmt: skip
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="train share held out to choose L2")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations per fit at most")
    p.add_argument("--output", default=None, help=f"results JSON (default: {RESULTS_FILE} in the checkpoint)")


def main(args: argparse.Namespace) -> int:
    model, spec, reading = load_for_eval(args)
    start = time.perf_counter()
    result = linear_eval(
        model, spec, args.train, args.val, features=args.features, blocks=args.blocks, grid=args.l2_grid,
        holdout_fraction=args.holdout_fraction, seed=args.seed, max_iter=args.max_iter, **reading,
    )  # fmt: skip
    result.update(checkpoint=spec["checkpoint"], which=args.which, train=args.train, val=args.val)
    output = Path(args.output) if args.output else Path(spec["checkpoint"]) / RESULTS_FILE
    output.write_text(json.dumps(result, indent=2) + "\n")
    blocks = "the last block" if args.blocks == 1 else f"the last {args.blocks} blocks"
    print(
        f"linear probe ({args.which} {args.features} of {blocks}, {result['feature_dim']} features) on "
        f"{result['n_test']} val / {result['n_train']} train images, {result['num_classes']} classes "
        f"({result['n_val_classes']} in val), matched by name:"
    )
    print(f"  top-1: {result['top1']:.2f}%   top-5: {result['top5']:.2f}%")
    held = f"{100 * args.holdout_fraction:g}%"
    print(f"  L2 strength {result['l2']:g} (sklearn C = {result['sklearn_C']:.3g}), chosen on a {held} "
          f"held-out part of the train images; {result['iterations']} L-BFGS iterations in the final fit"
          + ("" if result["converged"] else f" (stopped at --max-iter {args.max_iter})"))  # fmt: skip
    print(f"  ({time.perf_counter() - start:.1f} s; {output})")
    return 0
