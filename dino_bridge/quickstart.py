"""``dino-bridge quickstart``: pretrain a small ViT on Fashion-MNIST on the CPU in a few minutes.

It measures 20-NN accuracy of the teacher CLS before training (the initialisation) and after,
on the same seeded subsets of Fashion-MNIST's train and test splits, and leaves everything (config,
logs, metrics, checkpoints, ``quickstart_results.json``) in the output dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .config import load_config

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--config-file", default=str(REPO_CONFIGS / "quickstart.yaml"))
    p.add_argument(
        "--limit-train", type=int, default=10000, help="kNN train subset (Fashion-MNIST train split)"
    )
    p.add_argument("--limit-val", type=int, default=2000, help="kNN val subset (Fashion-MNIST test split)")
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if the output dir has checkpoints"
    )
    p.add_argument("opts", nargs="*", default=[], help="key=value overrides of the quickstart config")


def _knn(model, spec, args) -> dict:
    from .eval.run_knn import knn_eval

    return knn_eval(
        model,
        spec,
        "fashion-mnist:train",
        "fashion-mnist:test",
        limit_train=args.limit_train,
        limit_val=args.limit_val,
    )


def main(args: argparse.Namespace) -> int:
    from .data import FashionMNIST
    from .distributed.device import setup_runtime, shutdown_runtime
    from .eval import load_backbone, random_backbone
    from .train import build
    from .train.loop import train

    FashionMNIST("test")  # fails early, with the install hint, when the dataset is missing
    cfg = load_config(args.config_file, args.opts)
    output = Path(args.output_dir)
    started = time.perf_counter()

    spec = build.backbone_spec(cfg)
    before = _knn(random_backbone(spec, int(cfg.train.seed)), spec, args)
    print(f"kNN before training (initial teacher): 20-NN top-1 = {before['top1']['20']:.2f}%", flush=True)

    runtime = setup_runtime(str(cfg.MODEL.DEVICE))
    try:
        summary = train(cfg, runtime, output, resume=not args.no_resume)
    finally:
        shutdown_runtime()
    if summary.get("stopped_at") is not None:  # SIGINT / SIGTERM: checkpointed, not evaluated
        import signal

        from .train.signals import exit_code_for

        print(f"stopped at iteration {summary['stopped_at']}; rerun the same command to resume", flush=True)
        return exit_code_for(summary.get("stopped_by") or signal.SIGTERM)
    model, spec = load_backbone(output)
    after = _knn(model, spec, args)
    minutes = (time.perf_counter() - started) / 60
    result = {
        "knn_before": before,
        "knn_after": after,
        "iterations": build.total_iterations(cfg),
        "arch": str(cfg.student.arch),
        "minutes": round(minutes, 2),
        "checkpoint": spec["checkpoint"],
    }
    (output / "quickstart_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"kNN before training: 20-NN top-1 = {before['top1']['20']:.2f}%")
    print(f"kNN after training:  20-NN top-1 = {after['top1']['20']:.2f}%")
    print(f"({minutes:.1f} min; everything is in {output})")
    return 0
