"""``dino-bridge quickstart``: pretrain a small ViT on Fashion-MNIST on the CPU in a few minutes.

It measures the 20-NN accuracy of the teacher CLS and the linear-probe top-1 (``eval linear``'s
default features, at most ``--linear-max-iter`` L-BFGS iterations per fit) before training (the
initialisation) and after, on the same seeded subsets of Fashion-MNIST's train and test splits, with
the linear probe on the raw pixels of the same images as the baseline. Both probes use the features
of one pass over the images. Everything (config, logs, metrics, checkpoints,
``quickstart_results.json``) is left in the output dir.
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
        "--linear-max-iter", type=int, default=50, help="L-BFGS iterations per linear-probe fit at most"
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if the output dir has checkpoints"
    )
    p.add_argument("opts", nargs="*", default=[], help="key=value overrides of the quickstart config")


def _pixels_too(embed):
    """``embed`` plus {"pixels": the grey levels of the eval-transformed images [B, H·W]}."""

    def with_pixels(model, images):
        return {**embed(model, images), "pixels": images.mean(dim=1).flatten(1)}

    return with_pixels


def _evaluate(model, spec, args, pixels: bool = False) -> dict:
    """kNN and linear probe of one backbone from one feature pass (and raw pixels if asked)."""
    from .eval.features import labelled_features
    from .eval.run_knn import knn_summary
    from .eval.run_linear import linear_summary, probe_embedding

    embed = probe_embedding()
    data = labelled_features(
        model, spec, "fashion-mnist:train", "fashion-mnist:test", _pixels_too(embed) if pixels else embed,
        limit_train=args.limit_train, limit_val=args.limit_val,
    )  # fmt: skip
    results = {"knn": knn_summary(data), "linear": linear_summary(data, max_iter=args.linear_max_iter)}
    if pixels:
        results["pixels_linear"] = linear_summary(data, "pixels", max_iter=args.linear_max_iter)
    return results


def _precision_for(cfg, device, args):
    """The recipe's bf16 where it is fast; fp32 on a CPU that emulates bf16 (AVX2 only: 75-125x slower),
    unless the command line asked for a precision itself."""
    from .distributed.device import cpu_has_fast_bf16

    asked = any(opt.split("=", 1)[0] == "compute_precision.param_dtype" for opt in args.opts)
    if device.type != "cpu" or cfg.compute_precision.param_dtype != "bf16" or asked or cpu_has_fast_bf16():
        return cfg
    print(
        "no native bf16 on this CPU (no AVX-512/AMX): training in fp32 (compute_precision.param_dtype=fp32)",
        flush=True,
    )
    return load_config(args.config_file, [*args.opts, "compute_precision.param_dtype=fp32"])


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
    before = _evaluate(random_backbone(spec, int(cfg.train.seed)), spec, args, pixels=True)
    knn0, linear0 = before["knn"]["top1"]["20"], before["linear"]["top1"]
    print(f"before training (initial teacher): 20-NN top-1 = {knn0:.2f}%, linear top-1 = {linear0:.2f}%")
    print(f"raw pixels (the baseline): linear top-1 = {before['pixels_linear']['top1']:.2f}%", flush=True)

    runtime = setup_runtime(str(cfg.MODEL.DEVICE))
    cfg = _precision_for(cfg, runtime.device, args)
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
    after = _evaluate(model, spec, args)
    minutes = (time.perf_counter() - started) / 60
    result = {
        "knn_before": before["knn"],
        "knn_after": after["knn"],
        "linear_before": before["linear"],
        "linear_after": after["linear"],
        "linear_raw_pixels": before["pixels_linear"],
        "iterations": build.total_iterations(cfg),
        "arch": str(cfg.student.arch),
        "minutes": round(minutes, 2),
        "checkpoint": spec["checkpoint"],
    }
    (output / "quickstart_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"kNN before training: 20-NN top-1 = {before['knn']['top1']['20']:.2f}%")
    print(f"kNN after training:  20-NN top-1 = {after['knn']['top1']['20']:.2f}%")
    print(f"linear probe before training: top-1 = {before['linear']['top1']:.2f}%")
    print(f"linear probe after training:  top-1 = {after['linear']['top1']:.2f}%")
    print(f"linear probe on raw pixels:   top-1 = {before['pixels_linear']['top1']:.2f}% (the baseline)")
    print(f"({minutes:.1f} min; everything is in {output})")
    return 0
