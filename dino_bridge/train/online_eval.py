"""Online kNN evaluation of the teacher during training (``evaluation.*``; off by default).

Every ``evaluation.knn_period`` iterations (after the step of iteration ``it`` with
``(it + 1) % knn_period == 0``, in that iteration's metrics record) the teacher backbone, in eval
mode and without gradients, embeds a small labelled train set and val set (the CLS token, as
``dino-bridge eval knn`` does, with the same seeded subsets) and a weighted kNN gives
``knn/top1`` and ``knn/top5`` (%).

It is a collective step, taken by every rank at the same iterations. Each rank embeds every W-th
image of each set (W ranks), in as many forward calls as every other rank: a rank whose part is
used up runs a one-image padding batch whose output is dropped, because under FSDP2 each forward
all-gathers the teacher's shards. Features, labels and dataset positions are then gathered, put
back in dataset order, and every rank computes the same figures (no broadcast needed).

A failure (a folder that cannot be read, val classes the train set lacks, no readable image)
stops nothing. The ranks agree on a failure flag (one all-reduce) at every point where one rank
could fail alone, before any further collective, so none is left waiting in a forward; rank 0
logs it once and every rank switches the evaluation off. The evaluation draws from no random
stream of training: its subsets come from their own seeded generator and its loaders from their
own ``torch.Generator``, so a run with it has the losses of a run without.

Legend: N images of a set, B batch, D width.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from ..config.features import FeatureProblem
from ..data import EvalTransform
from ..data.datasets import DEMO_DATASETS
from ..distributed import dist
from ..eval.features import LabelledImages, labelled_source, match_classes, subset_indices
from ..eval.knn import knn_top_accuracy

logger = logging.getLogger("dino_bridge")

TOPS = (1, 5)


def knn_set_problems(cfg: DictConfig) -> list[FeatureProblem]:
    """Start-up check (before the model is built): each set is a demo dataset or an existing folder."""
    e = cfg.evaluation
    if int(e.knn_period) == 0:
        return []
    problems = []
    for key in ("knn_train", "knn_val"):
        spec = str(e[key])
        if spec.partition(":")[0] not in DEMO_DATASETS and not Path(spec).is_dir():
            valid = ", ".join(sorted(DEMO_DATASETS))
            message = f"{spec!r} is neither an image folder (class = subfolder) nor a demo dataset ({valid})"
            problems.append(FeatureProblem(f"evaluation.{key}", message))
    return problems


@dataclass(frozen=True)
class Part:
    """This rank's share of one labelled set, and the forward calls every rank makes for the set."""

    images: LabelledImages  # every W-th image of the (subset of the) set, from this rank's offset
    batches: int  # ceil(ceil(N / W) / B): the same on every rank


def split_across_ranks(indices: np.ndarray, rank: int, world: int, batch_size: int) -> tuple[np.ndarray, int]:
    """(this rank's dataset indices, forward calls per rank) for a set of dataset ``indices``."""
    per_rank = math.ceil(len(indices) / world)
    return indices[rank::world], math.ceil(per_rank / batch_size)


def _attempt(fn: Callable):
    """(fn(), None), or (None, the error in one line): a failure here must reach every rank."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - any failure of the evaluation only switches it off
        return None, f"{type(e).__name__}: {e}"


_NO_BATCH = (None, None, None, [])


def _collate(items):
    """(images [B,3,S,S], labels [B], dataset indices [B], errors) of the readable items."""
    good = [item for item, _ in items if item is not None]
    errors = [error for _, error in items if error is not None]
    if not good:
        return None, None, None, errors
    images = torch.stack([image for image, _, _ in good])
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    positions = torch.tensor([position for _, _, position in good], dtype=torch.long)
    return images, labels, positions, errors


def _gather(chunks: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order (a rank without rows sends ``empty``, of the right shape)."""
    return dist.all_gather_cat(torch.cat(chunks) if chunks else empty)


class _Positioned(torch.utils.data.Dataset):
    """A part's items with their index in the whole source (to restore dataset order after the gather)."""

    def __init__(self, images: LabelledImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        item, error = self.images[i]
        return (None if item is None else (*item, int(self.images.indices[i]))), error


class OnlineKnn:
    """The online kNN of one run; ``period`` 0: never due. Call it on every rank when ``due``."""

    def __init__(
        self,
        train: str | None,
        val: str | None,
        *,
        period: int,
        transform: EvalTransform,
        device: torch.device,
        k: int = 20,
        temperature: float = 0.07,
        limit_train: int | None = None,
        limit_val: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        self.train, self.val, self.period = train, val, int(period)
        self.transform, self.device = transform, device
        self.k, self.temperature = int(k), float(temperature)
        self.limits = {"train": limit_train, "val": limit_val}
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.enabled = self.period > 0
        self.parts: dict[str, Part] | None = None
        self._num_classes = 0
        self._warned: set[str] = set()

    def due(self, iteration: int) -> bool:
        return self.enabled and (iteration + 1) % self.period == 0

    # ------------------------------------------------------------------ preparation (once)
    def _prepare(self) -> None:
        train_source = labelled_source(self.train, "train")
        val_source = match_classes(train_source, labelled_source(self.val, "test"))  # by class name
        rank, world = dist.get_rank(), dist.get_world_size()
        parts = {}
        for seed, (role, source) in enumerate((("train", train_source), ("val", val_source))):
            indices = subset_indices(len(source), self.limits[role], seed=seed)  # as eval knn --limit-*
            indices = np.arange(len(source)) if indices is None else indices
            if len(indices) == 0:
                raise ValueError(f"evaluation.knn_{role} {getattr(self, role)!r} has no images")
            mine, batches = split_across_ranks(indices, rank, world, self.batch_size)
            parts[role] = Part(LabelledImages(source, self.transform, mine), batches)
        self.parts, self._num_classes = parts, len(train_source.classes)

    def _failed(self, problem: str | None, iteration: int) -> bool:
        """Collective: True on every rank when ``problem`` is set on any; then logged once, switched off."""
        if not dist.any_rank(problem is not None, self.device):
            return False
        problems = dist.all_gather_object(problem)
        rank = next(r for r, p in enumerate(problems) if p is not None)
        if dist.is_main_process():
            logger.warning(
                "online kNN (evaluation.*) failed at iteration %d on rank %d, switched off for the rest"
                " of the run: %s",
                iteration,
                rank,
                problems[rank],
            )
        self.enabled = False
        return True

    # ------------------------------------------------------------------ features
    def _loader(self, part: Part):
        return torch.utils.data.DataLoader(
            _Positioned(part.images),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_collate,
            generator=torch.Generator(),  # not the global one: training's random streams stay untouched
        )

    def _warn_unreadable(self, errors: list[str]) -> None:
        for error in errors:
            if error not in self._warned:
                self._warned.add(error)
                logger.warning("online kNN: skipped an unreadable image: %s", error)

    @torch.no_grad()
    def features(self, backbone: nn.Module, part: Part, iteration: int, autocast=contextlib.nullcontext):
        """Collective: (L2-normalised CLS features [N,D], labels [N]) of the whole set in dataset
        order on every rank, or None when some rank failed (then switched off). The backbone runs
        in eval mode (no RoPE coordinate augmentation) and is put back in its mode after."""
        was_training = backbone.training
        backbone.eval()
        try:
            return self._features(backbone, part, iteration, autocast)
        finally:
            backbone.train(was_training)

    def _features(self, backbone: nn.Module, part: Part, iteration: int, autocast):
        batches = iter(self._loader(part))
        padding = torch.zeros(1, 3, self.transform.size, self.transform.size, device=self.device)
        feats, labels, positions = [], [], []
        for _ in range(part.batches):
            batch, problem = _attempt(lambda: next(batches, _NO_BATCH))  # used up: a padding batch
            if self._failed(problem, iteration):
                return None
            images, batch_labels, batch_positions, errors = batch
            self._warn_unreadable(errors)
            with autocast():
                cls = backbone.forward_features(padding if images is None else images.to(self.device))
            if images is not None:
                feats.append(torch.nn.functional.normalize(cls["x_norm_clstoken"].float(), dim=1))
                labels.append(batch_labels.to(self.device))
                positions.append(batch_positions.to(self.device))
        width = cls["x_norm_clstoken"].shape[1]
        feats = _gather(feats, torch.zeros(0, width, device=self.device))
        labels = _gather(labels, torch.zeros(0, dtype=torch.long, device=self.device))
        positions = _gather(positions, torch.zeros(0, dtype=torch.long, device=self.device))
        order = positions.argsort()
        return feats[order], labels[order]

    # ------------------------------------------------------------------ the evaluation
    @torch.no_grad()
    def __call__(
        self, backbone: nn.Module, iteration: int, autocast=contextlib.nullcontext
    ) -> dict[str, float]:
        """Collective: ``knn/top1``, ``knn/top5`` (%) and ``knn/seconds``; {} once switched off."""
        if not self.enabled:
            return {}
        start = time.perf_counter()
        if self.parts is None:
            _, problem = _attempt(self._prepare)
            if self._failed(problem, iteration):
                return {}
        embedded = {}
        for role, part in self.parts.items():
            embedded[role] = self.features(backbone, part, iteration, autocast)
            if embedded[role] is None:
                return {}
        (train_feats, train_labels), (val_feats, val_labels) = embedded["train"], embedded["val"]
        top, problem = _attempt(
            lambda: knn_top_accuracy(
                train_feats,
                train_labels,
                val_feats,
                val_labels,
                k=self.k,
                num_classes=self._num_classes,
                temperature=self.temperature,
                tops=TOPS,
            )
        )
        if self._failed(problem, iteration):
            return {}
        figures = {f"knn/top{t}": value for t, value in top.items()}
        return {**figures, "knn/seconds": time.perf_counter() - start}


def build_online_knn(cfg: DictConfig, device: torch.device) -> OnlineKnn:
    """The run's online kNN from ``evaluation.*`` (never due when ``knn_period`` is 0); the images are
    prepared as the global crops are normalised, at the global crop size."""
    e, crops = cfg.evaluation, cfg.crops
    transform = EvalTransform(int(crops.global_crops_size), tuple(crops.rgb_mean), tuple(crops.rgb_std))
    return OnlineKnn(
        e.knn_train,
        e.knn_val,
        period=int(e.knn_period),
        transform=transform,
        device=device,
        k=int(e.knn_k),
        temperature=float(e.knn_temperature),
        limit_train=None if e.knn_limit_train is None else int(e.knn_limit_train),
        limit_val=None if e.knn_limit_val is None else int(e.knn_limit_val),
        batch_size=int(e.knn_batch_size),
        num_workers=int(e.knn_num_workers),
    )
