"""Image sources: txt lists, folders, a demo dataset, seeded subsets and concatenations.

Every source has the same small interface (``ImageSource``): ``len(source)``, ``load(index)`` returning
an RGB ``PIL.Image`` (it may raise ``ImageLoadError``; the training dataset replaces such files),
``describe(index)`` naming the item for messages (a path, or ``fashion-mnist-train[123]``), and
``labels`` / ``classes`` (``None`` for unlabelled sources).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from dino_bridge.data.images import IMAGE_EXTENSIONS, load_image
from dino_bridge.seeding import generator


@runtime_checkable
class ImageSource(Protocol):
    labels: list[int] | None
    classes: list[str] | None

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...

    def describe(self, index: int) -> str: ...


def _check_index(index: int, length: int, name: str) -> int:
    if not -length <= index < length:
        raise IndexError(f"{name}: index {index} out of range for {length} items")
    return index % length


def _check_draft(draft_min_side: int) -> int:
    if int(draft_min_side) < 0:
        raise ValueError(f"draft_min_side must be >= 0 (0: full-size decoding), got {draft_min_side}")
    return int(draft_min_side)


class _PathListSource:
    """A source backed by a list of file paths (shared by txt lists and folders)."""

    paths: list[str]
    labels: list[int] | None = None
    classes: list[str] | None = None
    draft_min_side: int = 0  # > 0: JPEGs decoded at reduced size (``images.load_image``)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.paths[_check_index(index, len(self.paths), type(self).__name__)]
        return load_image(path, self.draft_min_side)

    def describe(self, index: int) -> str:
        return self.paths[_check_index(index, len(self.paths), type(self).__name__)]


class ImageListDataset(_PathListSource):
    """Images listed in a text file, one path per line (``data.<name>.txt_path``).

    Relative paths are resolved against the txt file's own folder; blank lines and lines starting with
    ``#`` are ignored. Paths are not checked here: a missing file fails at load time like any unreadable
    image (and is replaced during training). ``draft_min_side``: see ``images.load_image``.
    """

    def __init__(self, txt_path: str | os.PathLike, *, draft_min_side: int = 0) -> None:
        txt_path = os.fspath(txt_path)
        if not os.path.isfile(txt_path):
            raise ValueError(f"image list file {txt_path!r} does not exist (or is not a file)")
        base_dir = os.path.dirname(os.path.abspath(txt_path))
        with open(txt_path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        entries = [line for line in lines if line and not line.startswith("#")]
        if not entries:
            raise ValueError(f"image list file {txt_path!r} lists no images (only blanks/comments)")
        self.txt_path = txt_path
        self.draft_min_side = _check_draft(draft_min_side)
        self.paths = [os.path.normpath(os.path.join(base_dir, entry)) for entry in entries]


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_images(folder: str) -> list[str]:
    """Relative paths of all images under ``folder`` (recursive, hidden entries skipped, sorted)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and _has_image_extension(name):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return sorted(found)


class ImageFolderDataset(_PathListSource):
    """All images under ``root`` (recursive; extensions from ``IMAGE_EXTENSIONS``, any case; sorted).

    With ``labelled=True`` the class of an image is its first-level subfolder (classes sorted by name),
    and images lying directly in ``root`` are an error. ``draft_min_side``: see ``images.load_image``.
    """

    def __init__(self, root: str | os.PathLike, labelled: bool = False, *, draft_min_side: int = 0) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist (or is not a directory)")
        relative_paths = _scan_images(root)
        if not relative_paths:
            raise ValueError(
                f"image folder {root!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.root = root
        self.draft_min_side = _check_draft(draft_min_side)
        self.paths = [os.path.join(root, rel) for rel in relative_paths]
        if labelled:
            top_level = [rel for rel in relative_paths if os.sep not in rel]
            if top_level:
                raise ValueError(
                    f"labelled image folder {root!r} has images outside class subfolders, "
                    f"e.g. {top_level[0]!r}"
                )
            class_names = [rel.split(os.sep, 1)[0] for rel in relative_paths]
            self.classes = sorted(set(class_names))
            class_index = {name: i for i, name in enumerate(self.classes)}
            self.labels = [class_index[name] for name in class_names]


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "DINO_BRIDGE_FASHION_MNIST"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read an IDX file (gzip): big-endian magic, dims, then unsigned bytes."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path!r} is not an IDX file of the expected kind (magic {magic})")
    num_dims = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(num_dims)]
    offset = 4 + 4 * num_dims
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


class FashionMNIST:
    """Fashion-MNIST from its IDX gz files (Debian/Ubuntu package ``dataset-fashion-mnist``).

    The root is ``root`` if given, else ``$DINO_BRIDGE_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist``. Images are 28×28 grey, returned as RGB.
    """

    classes: list[str] | None = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None) -> None:
        if split not in _FASHION_MNIST_PREFIX:
            raise ValueError(f"FashionMNIST split {split!r} is not one of {sorted(_FASHION_MNIST_PREFIX)}")
        if root is None:
            root = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT
        root = os.fspath(root)
        prefix = _FASHION_MNIST_PREFIX[split]
        images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
        labels_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
        missing = [path for path in (images_path, labels_path) if not os.path.isfile(path)]
        if missing:
            raise ValueError(
                f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
                f"`apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_ROOT}), or pass another "
                f"root / set {FASHION_MNIST_ENV} to a folder holding the *-idx*-ubyte.gz files."
            )
        self.split = split
        self.root = root
        self.images = _read_idx(images_path, 2051)
        self.labels = _read_idx(labels_path, 2049).astype(np.int64).tolist()
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"Fashion-MNIST in {root!r}: {len(self.images)} images but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        index = _check_index(index, len(self), "FashionMNIST")
        return Image.fromarray(self.images[index]).convert("RGB")

    def describe(self, index: int) -> str:
        return f"fashion-mnist-{self.split}[{index}]"


# name -> a callable taking ``split=`` (plain dict registry).
DEMO_DATASETS: dict[str, Callable[..., ImageSource]] = {
    "fashion-mnist": FashionMNIST,
}


def build_demo_dataset(name: str, split: str = "train") -> ImageSource:
    """A built-in demo dataset by name (``DEMO_DATASETS``)."""
    if name not in DEMO_DATASETS:
        raise ValueError(f"unknown demo dataset {name!r}; valid names: {', '.join(sorted(DEMO_DATASETS))}")
    return DEMO_DATASETS[name](split=split)


class SubsetDataset:
    """A seeded random subset of ``round(ratio·n)`` items (at least 1), kept in the base's order.

    This is ``data.<name>.dataset_ratio``: the subset depends on ``seed`` only (the same on every rank,
    so the sampler can shard it). ``ratio == 1.0`` keeps every item.
    """

    def __init__(self, base: ImageSource, ratio: float, seed: int) -> None:
        ratio = float(ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"dataset_ratio must be in (0, 1], got {ratio}")
        total = len(base)
        if ratio == 1.0:
            self.indices = list(range(total))
        else:
            count = max(1, round(ratio * total))
            chosen = torch.randperm(total, generator=generator(seed, "dataset_subset"))[:count]
            self.indices = sorted(chosen.tolist())
        self.base = base
        self.ratio = ratio
        base_labels = getattr(base, "labels", None)
        self.labels = None if base_labels is None else [base_labels[i] for i in self.indices]
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.base.load(self.indices[_check_index(index, len(self), "SubsetDataset")])

    def describe(self, index: int) -> str:
        return self.base.describe(self.indices[_check_index(index, len(self), "SubsetDataset")])


class ConcatImageDataset:
    """Several sources one after the other (``data.<name>`` entries of the config, in order).

    ``datasets`` is a mapping name → source or a sequence (named "0", "1", ...). ``describe`` returns the
    member's own description; ``locate(index)`` gives ``(name, index within that source)``. Labels are not
    merged (class sets of different sources do not line up).
    """

    labels: list[int] | None = None
    classes: list[str] | None = None

    def __init__(self, datasets: Mapping[str, ImageSource] | Sequence[ImageSource]) -> None:
        if isinstance(datasets, Mapping):
            named = list(datasets.items())
        else:
            named = [(str(i), source) for i, source in enumerate(datasets)]
        if not named:
            raise ValueError("ConcatImageDataset needs at least one dataset")
        for name, source in named:
            if len(source) == 0:
                raise ValueError(f"dataset {name!r} is empty")
        self.names = [name for name, _ in named]
        self.datasets = [source for _, source in named]
        self.offsets = np.cumsum([0] + [len(source) for source in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def _split(self, index: int) -> tuple[int, int]:
        index = _check_index(index, len(self), "ConcatImageDataset")
        member = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return member, index - self.offsets[member]

    def locate(self, index: int) -> tuple[str, int]:
        member, local_index = self._split(index)
        return self.names[member], local_index

    def load(self, index: int) -> Image.Image:
        member, local_index = self._split(index)
        return self.datasets[member].load(local_index)

    def describe(self, index: int) -> str:
        member, local_index = self._split(index)
        return self.datasets[member].describe(local_index)
