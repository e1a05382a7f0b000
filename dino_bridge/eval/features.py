"""Frozen-backbone features for evaluation: load an exported backbone, embed a labelled image set."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import EvalTransform, ImageFolderDataset, ImageLoadError, build_demo_dataset
from ..data.datasets import DEMO_DATASETS
from ..models import build_vit

logger = logging.getLogger("dino_bridge")


def _empty_backbone(spec: dict) -> nn.Module:
    """The backbone described by a checkpoint's ``backbone.json``, allocated on CPU, uninitialised."""
    with torch.device("meta"):
        model = build_vit(spec["arch"], drop_path_rate=0.0, **spec["kwargs"])
    return model.to_empty(device="cpu")


def load_backbone(checkpoint: str | Path, which: str = "teacher") -> tuple[nn.Module, dict]:
    """The ``teacher`` (or ``student``) backbone exported in a checkpoint, in eval mode, on CPU.

    ``checkpoint`` is one checkpoint folder, a ``ckpt`` folder or a run directory (latest checkpoint).
    """
    from ..train.checkpoint import backbone_weights_file, load_backbone_weights_, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    weights = backbone_weights_file(path, which)
    spec = json.loads((path / "backbone.json").read_text())
    model = _empty_backbone(spec)
    load_backbone_weights_(model, weights)  # strict: a mismatch is an error, never uninitialised weights
    model.eval()
    spec["checkpoint"] = str(path)
    return model, spec


def random_backbone(spec: dict, seed: int = 0) -> nn.Module:
    """The backbone of ``spec`` at its initialisation (the 'before training' baseline)."""
    model = _empty_backbone(spec)
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


class LabelledImages(torch.utils.data.Dataset):
    """(image tensor, label) pairs; unreadable images yield None and are dropped by ``collate``."""

    def __init__(self, source, transform, indices: np.ndarray | None = None):
        if getattr(source, "labels", None) is None:
            raise ValueError(f"{type(source).__name__} has no labels; evaluation needs labelled data")
        self.source = source
        self.transform = transform
        self.indices = np.arange(len(source)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        try:
            image = self.source.load(index)
        except ImageLoadError as e:
            return None, str(e)
        return (self.transform(image), self.source.labels[index]), None


def _collate(items):
    good = [item for item, _ in items if item is not None]
    errors = [err for _, err in items if err is not None]
    if not good:
        return None, None, errors
    images = torch.stack([img for img, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, errors


def labelled_source(spec: str, default_split: str):
    """A demo name (``fashion-mnist`` or ``fashion-mnist:test``) or an image folder (class = subfolder)."""
    name, _, split = spec.partition(":")
    if name in DEMO_DATASETS:
        return build_demo_dataset(name, split or default_split)
    path = Path(spec)
    if not path.is_dir():
        valid = ", ".join(sorted(DEMO_DATASETS))
        raise FileNotFoundError(f"{spec!r} is neither an image folder nor a demo dataset ({valid})")
    return ImageFolderDataset(path, labelled=True)


class RelabelledSource:
    """``source`` with its labels re-indexed into another class list (same images, same order)."""

    def __init__(self, source, classes: list[str], labels: list[int]):
        self.source, self.classes, self.labels = source, classes, labels

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int):
        return self.source.load(index)

    def describe(self, index: int) -> str:
        return self.source.describe(index)


def match_classes(train_source, val_source):
    """``val_source`` labelled by ``train_source``'s class indices, matched by class NAME.

    Probes index classes by position; two folders sort their own class names, so their positions
    agree only when their class sets do. A val class that the train set lacks cannot be predicted:
    an error naming it. Train classes absent from val are fine (they can still be predicted)."""
    names = {}
    for role, source in (("train", train_source), ("val", val_source)):
        if getattr(source, "labels", None) is None or getattr(source, "classes", None) is None:
            raise ValueError(f"the {role} images have no class names; evaluation needs labelled classes")
        names[role] = list(source.classes)
    index = {name: i for i, name in enumerate(names["train"])}
    missing = [name for name in names["val"] if name not in index]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise ValueError(
            f"val class(es) {shown} do not exist in the train images (train classes:"
            f" {', '.join(names['train'][:10])}{', ...' if len(names['train']) > 10 else ''})"
        )
    if names["val"] == names["train"]:
        return val_source
    remap = [index[name] for name in names["val"]]
    return RelabelledSource(val_source, names["train"], [remap[label] for label in val_source.labels])


def subset_indices(n: int, limit: int | None, seed: int = 0) -> np.ndarray | None:
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


Embed = Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]


def cls_embedding(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"cls": the L2-normalised CLS [B, D]} (the kNN feature: ``model(images)``)."""
    return {"cls": torch.nn.functional.normalize(model(images).float(), dim=1)}


@torch.no_grad()
def extract_feature_sets(
    model: nn.Module,
    source,
    transform,
    embed: Embed = cls_embedding,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: features [n, ·] on CPU} as ``embed(model, images)`` names them, labels [n]).

    One pass over the images computes every feature set ``embed`` returns (the quickstart's kNN
    and linear features come from the same forward)."""
    loader = torch.utils.data.DataLoader(
        LabelledImages(source, transform, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    model = model.to(device).eval()
    feats, labels, skipped = {}, [], 0
    for images, batch_labels, errors in loader:
        for err in errors:
            logger.warning("eval: skipped %s", err)
        skipped += len(errors)
        if images is None:
            continue
        for name, out in embed(model, images.to(device)).items():
            feats.setdefault(name, []).append(out.float().cpu())
        labels.append(batch_labels)
    if not labels:
        raise ValueError("no readable images to evaluate")
    if skipped:
        logger.warning("eval: %d unreadable images skipped", skipped)
    return {name: torch.cat(parts) for name, parts in feats.items()}, torch.cat(labels)


def extract_features(
    model: nn.Module,
    source,
    transform,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised CLS features [n, D] on CPU, labels [n])."""
    feats, labels = extract_feature_sets(
        model, source, transform, indices=indices, batch_size=batch_size, num_workers=num_workers,
        device=device,
    )  # fmt: skip
    return feats["cls"], labels


@dataclass
class LabelledFeatures:
    """Features of a labelled train and val set, val labels in the train set's class indices."""

    train: dict[str, torch.Tensor]  # name -> [n_train, ·]
    train_labels: torch.Tensor  # [n_train]
    val: dict[str, torch.Tensor]  # name -> [n_val, ·]
    val_labels: torch.Tensor  # [n_val]
    classes: list[str]  # the train set's class names


def labelled_features(
    model: nn.Module,
    spec: dict,
    train: str,
    val: str,
    embed: Embed = cls_embedding,
    *,
    limit_train: int | None = None,
    limit_val: int | None = None,
    image_size: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> LabelledFeatures:
    """Embed ``train`` and ``val`` (image folders or demo names, seeded subsets of ``limit_*``
    images) with the checkpoint's eval transform; val classes are matched to train's by name."""
    transform = eval_transform_for(spec, image_size)
    train_source = labelled_source(train, "train")
    val_source = match_classes(train_source, labelled_source(val, "test"))  # by name, not position
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device)
    train_indices = subset_indices(len(train_source), limit_train)
    val_indices = subset_indices(len(val_source), limit_val, seed=1)
    train_feats, train_labels = extract_feature_sets(
        model, train_source, transform, embed, indices=train_indices, **common
    )
    val_feats, val_labels = extract_feature_sets(
        model, val_source, transform, embed, indices=val_indices, **common
    )
    unseen = sorted(set(val_labels.tolist()) - set(train_labels.tolist()))
    if unseen:  # the class exists in the train folder, not in its subset: it cannot be predicted
        names = ", ".join(repr(train_source.classes[i]) for i in unseen)
        logger.warning("eval: no train image of val class(es) %s in the train subset used", names)
    return LabelledFeatures(train_feats, train_labels, val_feats, val_labels, list(train_source.classes))


def eval_transform_for(spec: dict, image_size: int | None = None) -> EvalTransform:
    size = image_size or int(spec["kwargs"]["img_size"])
    return EvalTransform(size, rgb_mean=tuple(spec["rgb_mean"]), rgb_std=tuple(spec["rgb_std"]))
