"""The ``torch`` export: ``backbone.safetensors`` + ``backbone.json`` (our spec), read by
``dino_bridge.hub.load_backbone``. (Named torch_format.py so it does not shadow ``torch``.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHTS, SPEC = "backbone.safetensors", "backbone.json"


def write_torch(spec: dict, state: dict[str, torch.Tensor], out: str | Path) -> int:
    """Write every backbone tensor as stored (the full training backbone); returns the count."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    keep = {k: spec[k] for k in ("arch", "kwargs", "rgb_mean", "rgb_std") if k in spec}
    (out / SPEC).write_text(json.dumps({"format": "dino_bridge.backbone/1", **keep}, indent=2) + "\n")
    return len(state)
