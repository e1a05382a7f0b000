"""``dino-bridge export --checkpoint PATH --format hf|torch --out DIR``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from safetensors.torch import load_file

from .hf import write_hf
from .torch_format import write_torch

logger = logging.getLogger("dino_bridge")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, its ckpt/ folder, or a run dir")
    p.add_argument("--format", required=True, choices=("hf", "torch"))
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")


def main(args: argparse.Namespace) -> int:
    import json

    from ..train.checkpoint import backbone_weights_file, resolve_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    spec = json.loads((path / "backbone.json").read_text())
    state = load_file(str(backbone_weights_file(path, args.which)))
    write = write_hf if args.format == "hf" else write_torch
    count = write(spec, state, out)
    print(
        f"exported the {args.which} backbone of {path} ({args.format}):"
        f" {count} tensors mapped and checked -> {out}"
    )
    return 0
