"""kNN labels are matched by class NAME between the train and the val images, never by position."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pytest
import torch

from dino_bridge.eval import extract_features, knn_accuracy, load_backbone, match_classes
from dino_bridge.eval.features import eval_transform_for
from dino_bridge.eval.run_knn import knn_eval
from tests.helpers import REPO, make_image_folder, run_training, tiny_config


class NamedSource:
    """A labelled source of ``len(labels)`` items whose class list is in a chosen order."""

    def __init__(self, classes: list[str], labels: list[int]):
        self.classes, self.labels = classes, labels

    def __len__(self) -> int:
        return len(self.labels)


def test_val_classes_are_reindexed_by_name():
    train = NamedSource(["cat", "dog", "owl"], [0, 1, 2])
    val = NamedSource(["dog", "owl"], [0, 1, 1, 0])  # its own sorted positions: dog=0, owl=1
    matched = match_classes(train, val)
    assert matched.classes == ["cat", "dog", "owl"] and matched.labels == [1, 2, 2, 1]
    assert match_classes(train, NamedSource(["cat", "dog", "owl"], [2, 0])).labels == [2, 0]


def test_a_val_class_missing_from_train_is_an_error_naming_it():
    train = NamedSource(["cat", "dog"], [0, 1])
    with pytest.raises(ValueError, match=r"val class\(es\) 'owl' do not exist in the train images"):
        match_classes(train, NamedSource(["cat", "owl"], [0, 1]))
    with pytest.raises(ValueError, match="no class names"):
        match_classes(train, NamedSource(None, [0]))


def test_the_same_classes_in_another_order_give_the_same_accuracy():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g)
    names = ["a", "b", "c"]
    train_y = torch.randint(0, 3, (120,), generator=g)
    val_y = torch.randint(0, 3, (40,), generator=g)
    train_x = centers[train_y] + 0.5 * torch.randn(120, 8, generator=g)
    val_x = centers[val_y] + 0.5 * torch.randn(40, 8, generator=g)
    reference = knn_accuracy(train_x, train_y, val_x, val_y, ks=(5,))[5]
    # the val set lists its classes as c, a, b: its label i means names_val[i]
    order = ["c", "a", "b"]
    val_own = torch.tensor([order.index(names[int(y)]) for y in val_y])
    matched = match_classes(NamedSource(names, train_y.tolist()), NamedSource(order, val_own.tolist()))
    got = knn_accuracy(train_x, train_y, val_x, torch.tensor(matched.labels), ks=(5,))[5]
    assert got == pytest.approx(reference) and reference > 60
    positional = knn_accuracy(train_x, train_y, val_x, val_own, ks=(5,))[5]
    assert positional < reference - 20  # what matching by position scored: the bug this prevents


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    images = make_image_folder(root / "images", n=24)
    run_training(tiny_config(images, iterations=2, period=2), root / "run")
    return root


def test_knn_eval_on_folders_with_different_class_sets(checkpoint, caplog):
    train_dir = make_image_folder(checkpoint / "train3", n=30, classes=3, seed=1)
    val_dir = checkpoint / "val2"  # classes 1 and 2 only: positions 0, 1 in its own folder
    for name in ("class_1", "class_2"):
        shutil.copytree(train_dir / name, val_dir / name)
    _, spec = load_backbone(checkpoint / "run")
    size = int(spec["kwargs"]["img_size"])
    torch.manual_seed(0)  # pixels through a fixed random projection: distinct images, distinct features
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 64))
    with caplog.at_level(logging.WARNING, logger="dino_bridge"):
        result = knn_eval(model, spec, str(train_dir), str(val_dir), ks=(1, 200))
    assert "k=200 is larger than the 30 train images" in caplog.text
    assert result["k_used"] == {"1": 1, "200": 30}
    assert (result["n_classes"], result["n_val_classes"], result["n_val"]) == (3, 2, 20)
    # the val images are train images: with labels matched by name, 1-NN finds each one itself
    assert result["top1"]["1"] == pytest.approx(100.0)
    from dino_bridge.data import ImageFolderDataset

    feats, labels = extract_features(
        model, ImageFolderDataset(train_dir, labelled=True), eval_transform_for(spec)
    )
    assert set(labels.tolist()) == {0, 1, 2}


def test_eval_knn_command_refuses_a_val_class_that_train_lacks(checkpoint):
    train_dir = make_image_folder(checkpoint / "train2", n=20, classes=2, seed=2)
    val_dir = make_image_folder(checkpoint / "val3", n=15, classes=3, seed=3)
    out = subprocess.run(
        [sys.executable, "-m", "dino_bridge.cli", "eval", "knn", "--checkpoint", str(checkpoint / "run"),
         "--train", str(train_dir), "--val", str(val_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "val class(es) 'class_2' do not exist in the train images" in out.stderr
