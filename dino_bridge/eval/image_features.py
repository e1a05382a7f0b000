"""Features of an unlabelled image set (a folder or a txt list) from a checkpoint or an exported backbone.

Legend: B batch, N images, P patches per image, D width.
Rows follow the source's order (a folder: sorted relative paths; a list: its lines); unreadable
images are skipped and reported, never replaced, so row i is always ``paths[i]``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import EvalTransform, ImageFolderDataset, ImageListDataset, ImageLoadError
from ..data.ssl_dataset import NoReadableImageError
from .features import load_backbone
from .patch_pca import cell_size, pca_panel, pca_rgb, view_like_eval

FEATURE_KINDS = ("cls", "cls+avgpool", "patch-mean")


def image_source(images: str | Path) -> ImageFolderDataset | ImageListDataset:
    """A folder (every image under it, recursively) or a txt file listing image paths."""
    path = Path(images)
    if path.is_dir():
        return ImageFolderDataset(path)
    if path.is_file():
        return ImageListDataset(path)
    raise ValueError(f"images {str(images)!r}: no such folder or image-list file")


def is_exported_backbone(path: str | Path) -> bool:
    """A directory written by ``dino-bridge export`` (torch or hf), or an HF DINOv3 directory."""
    from ..export import hf
    from ..export.torch_format import SPEC, WEIGHTS

    path = Path(path)
    return ((path / SPEC).is_file() and (path / WEIGHTS).is_file()) or hf.is_hf_checkpoint(path)


def _hf_normalisation(path: Path) -> dict:
    from ..export.hf import PROCESSOR

    processor = (path if path.is_dir() else path.parent) / PROCESSOR
    if not processor.is_file():
        raise ValueError(f"{path} has no {PROCESSOR}: the image normalisation (mean, std) is unknown")
    config = json.loads(processor.read_text())
    return {"rgb_mean": list(config["image_mean"]), "rgb_std": list(config["image_std"])}


def load_feature_backbone(path: str | Path, which: str | None = None) -> tuple[nn.Module, dict]:
    """(backbone in eval mode on CPU, its spec with ``rgb_mean``/``rgb_std``, ``checkpoint``, ``which``).

    ``path``: a checkpoint folder, ``ckpt`` folder or run dir (``which``: teacher, the default, or
    student), or an exported backbone directory (one backbone: ``which`` must stay None)."""
    if not is_exported_backbone(path):
        model, spec = load_backbone(path, which or "teacher")
        return model, {**spec, "which": which or "teacher"}
    if which is not None:
        raise ValueError(f"{path} is an exported backbone (one backbone); --which applies to checkpoints")
    from ..hub import load_backbone as load_exported

    model = load_exported(path)
    spec = {**model.spec, "checkpoint": str(path), "which": "exported"}
    if "rgb_mean" not in spec:
        spec.update(_hf_normalisation(Path(path)))
    return model, spec


def pooled_features(outputs: dict[str, torch.Tensor], kind: str, l2: bool = True) -> torch.Tensor:
    """``forward_features`` outputs → [B, D] (``cls``, ``patch-mean``) or [B, 2D] (``cls+avgpool``:
    the CLS next to the mean of the patch tokens, both after the final norm); L2-normalised rows
    when ``l2``."""
    cls, patches = outputs["x_norm_clstoken"], outputs["x_norm_patchtokens"]
    if kind == "cls":
        feats = cls
    elif kind == "cls+avgpool":
        feats = torch.cat([cls, patches.mean(dim=1)], dim=1)
    elif kind == "patch-mean":
        feats = patches.mean(dim=1)
    else:
        raise ValueError(f"unknown feature kind {kind!r} (valid: {', '.join(FEATURE_KINDS)})")
    feats = feats.float()
    return torch.nn.functional.normalize(feats, dim=1) if l2 else feats


class _IndexedImages(torch.utils.data.Dataset):
    """(index, image tensor or None, why not or None) for every image of ``source``."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(self.source.load(index)), None
        except ImageLoadError as e:
            return index, None, e.reason


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


@dataclass
class ImageFeatures:
    features: np.ndarray  # float32 [N, D], row i from paths[i]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), unreadable


@torch.inference_mode()
def embed_images(
    model: nn.Module,
    source,
    transform,
    *,
    kind: str = "cls",
    l2: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ImageFeatures:
    """Features of every readable image of ``source``, in its order; unreadable ones are skipped and
    returned in ``skipped`` (for the caller to report). ``NoReadableImageError`` when none can be read."""
    from tqdm import tqdm

    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r} (valid: {', '.join(FEATURE_KINDS)})")
    loader = torch.utils.data.DataLoader(
        _IndexedImages(source, transform), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    model = model.to(device).eval()
    feats, paths, skipped = [], [], []
    bar = tqdm(total=len(source), disable=not progress, unit="img", desc="features", file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)  # fmt: skip
    for indices, images, bad in loader:
        for index, why in bad:
            skipped.append((source.describe(index), why))
        if images is not None:
            feats.append(pooled_features(model.forward_features(images.to(device)), kind, l2).cpu())
            paths.extend(source.describe(index) for index in indices)
        bar.update(len(indices) + len(bad))
        bar.set_postfix(skipped=len(skipped), refresh=False)
    bar.close()
    if not feats:
        first = f"{skipped[0][0]}: {skipped[0][1]}" if skipped else "no images"
        raise NoReadableImageError(f"none of the {len(source)} images could be read (first: {first})")
    return ImageFeatures(torch.cat(feats).numpy().astype(np.float32, copy=False), paths, skipped)


@torch.inference_mode()
def pca_picture(
    model: nn.Module,
    source,
    transform: EvalTransform,
    *,
    count: int = 4,
    foreground_threshold: float | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Image.Image, list[str]]:
    """(panel, paths): the first ``count`` readable images of ``source`` next to the PCA colours of
    their patch tokens, fitted on those images together (see ``patch_pca``)."""
    if count < 1:
        raise ValueError(f"the PCA picture needs at least one image, got {count}")
    cell, ratio = cell_size(transform.size), transform.resize_size / transform.size
    shown, tensors, paths = [], [], []
    for index in range(len(source)):
        if len(paths) == count:
            break
        try:
            image = source.load(index)
        except ImageLoadError:
            continue  # reported by the feature pass
        shown.append(view_like_eval(image, cell, ratio))  # the same region, at display size
        tensors.append(transform(image))
        paths.append(source.describe(index))
    if not paths:
        raise NoReadableImageError(f"none of the {len(source)} images could be read for the PCA picture")
    batch = torch.stack(tensors).to(device)
    tokens = model.to(device).eval().forward_features(batch)["x_norm_patchtokens"].float().cpu()
    grid = model.patch_embed.grid_size(batch.shape[-2], batch.shape[-1])
    maps = pca_rgb(tokens, grid, foreground_threshold)
    return pca_panel(shown, maps, cell), paths
