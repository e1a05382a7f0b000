"""Hugging Face DINOv3 directories: write one from our backbone, read one back (export/import).

A directory holds ``config.json``, ``model.safetensors`` (fp32) and ``preprocessor_config.json``;
the key map itself lives in ``hf_adapter``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.transforms import EvalTransform
from . import hf_adapter

logger = logging.getLogger("dino_bridge")

CONFIG, WEIGHTS, PROCESSOR = "config.json", "model.safetensors", "preprocessor_config.json"


def processor_config(spec: dict) -> dict:
    """DINOv3ViTImageProcessor settings equal to our EvalTransform: short side, centre crop, bicubic."""
    size = int(spec["kwargs"]["img_size"])
    transform = EvalTransform(size, rgb_mean=tuple(spec["rgb_mean"]), rgb_std=tuple(spec["rgb_std"]))
    return {
        "image_processor_type": "DINOv3ViTImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": transform.resize_size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": transform.rgb_mean,
        "image_std": transform.rgb_std,
    }


def write_hf(spec: dict, state: dict[str, torch.Tensor], out: str | Path) -> int:
    """Write the HF directory; returns the number of tensors written (checked to map back exactly)."""
    config, tensors = hf_adapter.to_hf(spec, state)
    _, back = hf_adapter.from_hf(config, tensors, spec)
    mismatched = [k for k, v in back.items() if k in state and not _same_mapped(k, v, state[k], spec)]
    assert not mismatched, f"tensors that do not map back: {mismatched[:5]}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if "rgb_mean" in spec:
        (out / PROCESSOR).write_text(json.dumps(processor_config(spec), indent=2) + "\n")
    return len(tensors)


def _same_mapped(key: str, back: torch.Tensor, original: torch.Tensor, spec: dict) -> bool:
    a = hf_adapter.resolved_arguments(spec)
    if key.endswith("attn.qkv.bias") and a["mask_k_bias"]:  # the inert K bias is not exported
        D = int(a["embed_dim"])
        back, original = torch.cat([back[:D], back[2 * D :]]), torch.cat([original[:D], original[2 * D :]])
    if key.startswith("local_cls_norm."):
        return True  # rebuilt from norm, by design
    return torch.equal(back.to(original.dtype), original)


def is_hf_checkpoint(path: str | Path) -> bool:
    """A directory with an HF DINOv3 ``config.json``, or a ``model.safetensors`` next to one."""
    path = Path(path)
    config = path / CONFIG if path.is_dir() else path.with_name(CONFIG)
    if not config.is_file() or (path.is_file() and path.suffix != ".safetensors"):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "dinov3_vit"
    except ValueError:
        return False


def read_hf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of an HF DINOv3 directory or its ``model.safetensors``."""
    path = Path(path)
    if not is_hf_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a Hugging Face DINOv3 checkpoint (no dinov3_vit {CONFIG})")
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    config = json.loads((weights.with_name(CONFIG)).read_text())
    return config, load_file(str(weights))


def load_hf_backbone_(backbone: nn.Module, path: str | Path, spec: dict) -> Path:
    """Load HF DINOv3 weights into our configured ``backbone`` (described by ``spec``); strict."""
    from ..train.checkpoint import load_backbone_state_

    config, tensors = read_hf(path)
    a = hf_adapter.resolved_arguments(spec)
    width = {n: m for n, m in backbone.named_modules()}["blocks.0.mlp"]
    first = width.w1 if a["ffn_layer"].startswith("swiglu") else width.fc1
    hf_adapter.check_compatible(config, spec, first.out_features)
    _, state = hf_adapter.from_hf(config, tensors, spec)
    logger.info("imported %d HF tensors into the backbone", len(tensors))
    return load_backbone_state_(backbone, state, Path(path))
