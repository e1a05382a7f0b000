"""``load_backbone(DIR)``: a backbone exported by ``dino-bridge export`` (either format), ready to use.

model = dino_bridge.hub.load_backbone("exported/")
out = model.forward_features(images)   # x_norm_clstoken, x_norm_patchtokens, x_storage_tokens
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from .eval.features import _empty_backbone
from .export import hf, hf_adapter
from .export.torch_format import SPEC, WEIGHTS


def load_backbone(path: str | Path, device: str = "cpu") -> nn.Module:
    """Our ViT from a ``torch`` export (backbone.json + backbone.safetensors) or an HF DINOv3 directory
    (RoPE then runs in fp32, as in HF), in eval mode. ``model.spec`` holds its spec."""
    from .train.checkpoint import load_backbone_state_

    path = Path(path)
    if (path / SPEC).is_file() and (path / WEIGHTS).is_file():
        spec = json.loads((path / SPEC).read_text())
        state, source = load_file(str(path / WEIGHTS)), path / WEIGHTS
    elif hf.is_hf_checkpoint(path):
        config, tensors = hf.read_hf(path)
        spec, state = hf_adapter.from_hf(config, tensors)
        source = path
    else:
        raise FileNotFoundError(f"{path} holds neither {SPEC} + {WEIGHTS} nor a Hugging Face DINOv3 model")
    model = _empty_backbone(spec)
    load_backbone_state_(model, state, source)
    model.spec = spec
    return model.to(device).eval()
