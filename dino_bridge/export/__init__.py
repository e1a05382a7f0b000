"""Export a checkpoint's backbone: ``hf`` (transformers' DINOv3ViTModel) or ``torch`` (our hub)."""

from .hf import is_hf_checkpoint, load_hf_backbone_, read_hf, write_hf
from .torch_format import write_torch

__all__ = ["is_hf_checkpoint", "load_hf_backbone_", "read_hf", "write_hf", "write_torch"]
