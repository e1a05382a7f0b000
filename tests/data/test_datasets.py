import gzip
import os

import numpy as np
import pytest
from PIL import Image

from dino_bridge.data.datasets import (
    DEMO_DATASETS,
    FASHION_MNIST_CLASSES,
    ConcatImageDataset,
    FashionMNIST,
    ImageFolderDataset,
    ImageListDataset,
    ImageSource,
    SubsetDataset,
    build_demo_dataset,
)
from dino_bridge.data.images import ImageLoadError

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


def _save(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (value, value, value)).save(path)
    return path


def test_image_list_relative_absolute_comments_blanks(tmp_path):
    a = _save(tmp_path / "imgs" / "a.png", 10)
    b = _save(tmp_path / "elsewhere" / "b.png", 20)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n\n  ../imgs/a.png  \n{b}\n   \n#{a}\n../imgs/missing.png\n")
    dataset = ImageListDataset(listing)
    assert isinstance(dataset, ImageSource)
    assert len(dataset) == 3
    assert dataset.describe(0) == str(a) and dataset.describe(1) == str(b)
    assert dataset.load(0).getpixel((0, 0)) == (10, 10, 10)
    assert dataset.load(1).mode == "RGB"
    assert dataset.labels is None and dataset.classes is None
    with pytest.raises(ImageLoadError, match="missing.png"):
        dataset.load(2)  # not checked up front, fails at load time
    with pytest.raises(IndexError):
        dataset.load(3)


def test_image_list_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.txt"):
        ImageListDataset(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        ImageListDataset(tmp_path / "empty.txt")


def test_image_folder_recursive_sorted_and_labelled(tmp_path):
    _save(tmp_path / "dog" / "b.JPG", 1)
    _save(tmp_path / "dog" / "deep" / "a.png", 2)
    _save(tmp_path / "cat" / "z.jpeg", 3)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _save(tmp_path / ".hidden" / "x.png", 4)
    dataset = ImageFolderDataset(tmp_path)
    relative = [os.path.relpath(dataset.describe(i), tmp_path) for i in range(len(dataset))]
    assert relative == sorted(relative) and len(relative) == 3
    assert dataset.labels is None

    labelled = ImageFolderDataset(tmp_path, labelled=True)
    assert labelled.classes == ["cat", "dog"]
    by_name = {os.path.basename(labelled.describe(i)): labelled.labels[i] for i in range(len(labelled))}
    assert by_name == {"z.jpeg": 0, "b.JPG": 1, "a.png": 1}


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="missing_dir"):
        ImageFolderDataset(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    _save(tmp_path / "loose" / "top.png", 1)
    _save(tmp_path / "loose" / "cls" / "in.png", 1)
    with pytest.raises(ValueError, match="top.png"):
        ImageFolderDataset(tmp_path / "loose", labelled=True)


class _Numbers:
    labels = None
    classes = None

    def __init__(self, n, name="n"):
        self.n, self.name = n, name
        self.labels = list(range(n))

    def __len__(self):
        return self.n

    def load(self, index):
        return Image.new("RGB", (2, 2), (index, 0, 0))

    def describe(self, index):
        return f"{self.name}[{index}]"


def test_subset_ratio_size_determinism_and_validation():
    base = _Numbers(1000)
    subset = SubsetDataset(base, 0.25, seed=3)
    assert len(subset) == 250
    chosen = [int(subset.describe(i)[2:-1]) for i in range(len(subset))]
    assert chosen == sorted(set(chosen))  # distinct, kept in base order
    assert subset.labels == chosen
    assert SubsetDataset(base, 0.25, seed=3).indices == subset.indices
    assert SubsetDataset(base, 0.25, seed=4).indices != subset.indices
    assert SubsetDataset(base, 1.0, seed=3).indices == list(range(1000))
    assert len(SubsetDataset(base, 1e-6, seed=0)) == 1
    assert len(SubsetDataset(_Numbers(10), 0.33, seed=0)) == 3
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            SubsetDataset(base, bad, seed=0)


def test_concat_describe_and_locate():
    concat = ConcatImageDataset({"a": _Numbers(3, "a"), "b": _Numbers(2, "b")})
    assert len(concat) == 5
    assert [concat.describe(i) for i in range(5)] == ["a[0]", "a[1]", "a[2]", "b[0]", "b[1]"]
    assert concat.locate(3) == ("b", 0)
    assert concat.load(4).getpixel((0, 0)) == (1, 0, 0)
    assert ConcatImageDataset([_Numbers(1), _Numbers(1)]).names == ["0", "1"]
    with pytest.raises(IndexError):
        concat.describe(5)
    with pytest.raises(ValueError):
        ConcatImageDataset([])


def _write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_tiny_files_via_env(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 4]), 2049)
    monkeypatch.setenv("DINO_BRIDGE_FASHION_MNIST", str(tmp_path))
    dataset = FashionMNIST("test")
    assert len(dataset) == 3 and dataset.labels == [9, 0, 4]
    image = dataset.load(2)
    assert image.mode == "RGB" and image.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], images[2])
    assert dataset.describe(2) == "fashion-mnist-test[2]"
    assert dataset.classes[dataset.labels[0]] == "Ankle boot"


def test_fashion_mnist_missing_root_message(tmp_path, monkeypatch):
    monkeypatch.delenv("DINO_BRIDGE_FASHION_MNIST", raising=False)
    with pytest.raises(ValueError) as caught:
        FashionMNIST("train", root=tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(caught.value)
    assert "nowhere" in str(caught.value)
    with pytest.raises(ValueError, match="split"):
        FashionMNIST("val", root=tmp_path)


def test_demo_registry_unknown_name_lists_valid():
    assert "fashion-mnist" in DEMO_DATASETS
    with pytest.raises(ValueError, match="fashion-mnist"):
        build_demo_dataset("imagenet")


@pytest.mark.skipif(not os.path.isdir(FASHION_ROOT), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("DINO_BRIDGE_FASHION_MNIST", raising=False)
    test_split = build_demo_dataset("fashion-mnist", split="test")
    assert len(test_split) == 10000
    assert test_split.load(0).size == (28, 28) and test_split.load(0).mode == "RGB"
    assert sorted(set(test_split.labels)) == list(range(10))
    assert test_split.classes == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10
    train_split = FashionMNIST("train")
    assert len(train_split) == 60000 and train_split.images.shape == (60000, 28, 28)
