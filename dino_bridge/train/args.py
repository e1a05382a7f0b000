"""Command line of ``python -m dino_bridge.train`` (also ``dino-bridge train``), the seed's CLI."""

from __future__ import annotations

import argparse
import json
import logging
import signal
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


# How a run ended (README, "When things go wrong"). Signals follow the shell: 128 + the signal.
EXIT_FINISHED = 0
EXIT_USER_ERROR = 2  # config, paths, run dir, a resume that cannot work: the message names it
EXIT_NON_FINITE = 3  # too many consecutive non-finite losses
EXIT_UNREADABLE_DATA = 4  # no readable image could be found
EXIT_CHECKPOINT_WRITE = 5  # a checkpoint could not be written (disk full, permission)
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143


def exit_code(error: BaseException) -> int | None:
    """The exit code for an error that ends a run cleanly (no traceback); None for our own bugs."""
    from ..data.ssl_dataset import NoReadableImageError
    from .checkpoint import CheckpointWriteError, NoLoadableCheckpointError
    from .loop import NonFiniteLossError
    from .signals import StoppedAtOnce, exit_code_for

    codes = (
        ((ConfigError, FileNotFoundError, NoLoadableCheckpointError), EXIT_USER_ERROR),
        (NonFiniteLossError, EXIT_NON_FINITE),
        (NoReadableImageError, EXIT_UNREADABLE_DATA),
        (CheckpointWriteError, EXIT_CHECKPOINT_WRITE),
    )
    for kinds, code in codes:
        if isinstance(error, kinds):
            return code
    if isinstance(error, StoppedAtOnce):
        return exit_code_for(error.signum)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGINT
    return None


def one_line(error: BaseException) -> str:
    """The error's own message; one raised in a DataLoader worker arrives wrapped in the worker's
    traceback, whose last line is the original message."""
    from .signals import StoppedAtOnce

    if isinstance(error, StoppedAtOnce):
        return f"{error.args[0]} again: stopped at once; the last checkpoint is the resume point"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted before training started"
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(f"{type(error).__name__}: ", 1)[-1]
    return text


def _report(error: BaseException, handlers_before: tuple) -> None:
    """Log the error once training has set up its console and train.log (both get it), else print it.

    ``handlers_before``: the logger's handlers when this invocation began; handlers left by an earlier
    training in the same process write to a stream that is not this invocation's stderr."""
    logger = logging.getLogger("dino_bridge")
    if logger.handlers and tuple(logger.handlers) != handlers_before:
        logger.error("%s", one_line(error))
    else:
        print(f"error: {one_line(error)}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "python -m dino_bridge.train") -> int:
    """Exit codes: 0 finished; 2 a user error; 3 non-finite losses; 4 unreadable data; 5 a checkpoint
    write failed; 130 / 143 stopped by SIGINT / SIGTERM after its checkpoint."""
    args = build_parser(prog).parse_args(argv)
    handlers_before = tuple(logging.getLogger("dino_bridge").handlers)
    try:
        cfg = load_config(args.config_file, args.opts)
        if args.dry_run:
            from .dry_run import dry_run_report

            print(json.dumps(dry_run_report(cfg)))
            return EXIT_FINISHED
        if not args.output_dir:
            raise ConfigError("--output-dir is required to train")
        from ..distributed.device import setup_runtime, shutdown_runtime
        from .loop import train

        runtime = setup_runtime(str(cfg.MODEL.DEVICE))
        try:
            summary = train(cfg, runtime, args.output_dir, args.checkpoint_dir, resume=not args.no_resume)
        finally:
            shutdown_runtime()
    except (Exception, KeyboardInterrupt) as e:
        code = exit_code(e)
        if code is None:
            raise
        _report(e, handlers_before)
        return code
    if summary.get("stopped_at") is not None:
        from .signals import exit_code_for

        return exit_code_for(summary.get("stopped_by") or signal.SIGTERM)  # a rank the signal missed
    return EXIT_FINISHED
