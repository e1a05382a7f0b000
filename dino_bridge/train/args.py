"""Command line of ``python -m dino_bridge.train`` (also ``dino-bridge train``), the seed's CLI."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import ConfigError, load_config


def build_parser(prog: str = "python -m dino_bridge.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Self-supervised pretraining (DINO + iBOT + KoLeo).")
    p.add_argument("--config-file", "--config_file", dest="config_file", required=True, help="YAML config")
    p.add_argument(
        "--output-dir", "--output_dir", dest="output_dir", help="run directory (required unless --dry-run)"
    )
    p.add_argument(
        "--checkpoint_dir",
        "--checkpoint-dir",
        dest="checkpoint_dir",
        default=None,
        help="resume from this checkpoint (a ckpt/<n> folder or a run dir); wins over the output dir's own",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start fresh even if the output dir has checkpoints"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="build on the meta device, print one JSON line, exit"
    )
    p.add_argument(
        "opts", nargs="*", default=[], help="key=value overrides, e.g. train.batch_size_per_gpu=32"
    )
    return p


def main(argv: list[str] | None = None, prog: str = "python -m dino_bridge.train") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config_file, args.opts)
        if args.dry_run:
            from .dry_run import dry_run_report

            print(json.dumps(dry_run_report(cfg)))
            return 0
        if not args.output_dir:
            raise ConfigError("--output-dir is required to train")
        from ..distributed.device import setup_runtime, shutdown_runtime
        from .loop import train

        runtime = setup_runtime(str(cfg.MODEL.DEVICE))
        try:
            train(cfg, runtime, args.output_dir, args.checkpoint_dir, resume=not args.no_resume)
        finally:
            shutdown_runtime()
    except (ConfigError, FileNotFoundError) as e:
        logger = logging.getLogger("dino_bridge")
        if logger.handlers:  # training had started: the console and train.log both get it
            logger.error("%s", e)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
