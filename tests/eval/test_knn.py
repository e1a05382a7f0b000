import json
import subprocess
import sys

import pytest
import torch

from dino_bridge.eval.knn import knn_accuracy, knn_top_accuracy, topk_neighbours
from tests.helpers import REPO, make_image_folder, run_training, tiny_config


def _oracle(train, train_labels, test, test_labels, k, temperature):
    """Brute force: every test row against every train row, weighted votes exp(sim / T)."""
    train = torch.nn.functional.normalize(train, dim=1)
    test = torch.nn.functional.normalize(test, dim=1)
    correct = 0
    for x, y in zip(test, test_labels):
        sims = train @ x
        top = sims.argsort(descending=True)[:k]
        votes = {}
        for i in top.tolist():
            votes[int(train_labels[i])] = votes.get(int(train_labels[i]), 0.0) + float(
                (sims[i] / temperature).exp()
            )
        correct += int(max(votes, key=votes.get) == int(y))
    return 100.0 * correct / len(test)


def test_knn_matches_a_brute_force_oracle():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g)
    train_labels = torch.randint(0, 4, (300,), generator=g)
    test_labels = torch.randint(0, 4, (77,), generator=g)
    train = centers[train_labels] + 0.8 * torch.randn(300, 16, generator=g)
    test = centers[test_labels] + 0.8 * torch.randn(77, 16, generator=g)
    got = knn_accuracy(train, train_labels, test, test_labels, ks=(1, 10, 20), query_chunk=13, train_chunk=50)
    for k in (1, 10, 20):
        assert got[k] == pytest.approx(_oracle(train, train_labels, test, test_labels, k, 0.07))
    assert 40 < got[20] <= 100  # the clusters are separable: far above chance (25 %)


def _oracle_top(train, train_labels, test, test_labels, k, temperature, top, num_classes):
    """Brute force top-t: the class is among the t largest summed weights exp(sim / T)."""
    correct = 0
    for x, y in zip(test, test_labels):
        sims = train @ x
        scores = torch.zeros(num_classes, dtype=torch.float64)
        for i in sims.argsort(descending=True)[:k].tolist():
            scores[int(train_labels[i])] += float((sims[i] / temperature).exp())
        correct += int(int(y) in scores.argsort(descending=True)[:top].tolist())
    return 100.0 * correct / len(test)


def test_top5_knn_matches_a_brute_force_oracle():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(8, 16, generator=g)
    train_labels = torch.randint(0, 8, (200,), generator=g)
    test_labels = torch.randint(0, 8, (61,), generator=g)
    norm = torch.nn.functional.normalize
    train = norm(centers[train_labels] + 1.5 * torch.randn(200, 16, generator=g), dim=1)
    test = norm(centers[test_labels] + 1.5 * torch.randn(61, 16, generator=g), dim=1)
    got = knn_top_accuracy(
        train,
        train_labels,
        test,
        test_labels,
        k=20,
        num_classes=8,
        tops=(1, 5),
        query_chunk=9,
        train_chunk=33,
    )
    for top in (1, 5):
        expected = _oracle_top(train, train_labels, test, test_labels, 20, 0.07, top, 8)
        assert got[top] == pytest.approx(expected), top
    assert got[1] == pytest.approx(knn_accuracy(train, train_labels, test, test_labels, ks=(20,))[20])
    assert got[1] < got[5] < 100  # noisy clusters: top-5 strictly easier, not trivial with 8 classes
    # fewer classes than 5: top-5 is clipped to every class, hence always right
    two = knn_top_accuracy(train, train_labels % 2, test, test_labels % 2, k=20, num_classes=2)
    assert two[5] == 100.0


def test_chunking_does_not_change_the_neighbours():
    g = torch.Generator().manual_seed(1)
    queries, train = torch.randn(20, 8, generator=g), torch.randn(500, 8, generator=g)
    full_sims, full_idx = topk_neighbours(queries, train, 30, train_chunk=10_000)
    chunk_sims, chunk_idx = topk_neighbours(queries, train, 30, train_chunk=7)
    torch.testing.assert_close(chunk_sims, full_sims)
    assert torch.equal(chunk_idx, full_idx)


def test_k_larger_than_the_train_set_is_clipped():
    train, labels = torch.eye(3), torch.tensor([0, 1, 2])
    got = knn_accuracy(train, labels, train, labels, ks=(200,))
    assert got[200] == pytest.approx(100.0)  # the query itself has by far the largest weight


def test_eval_knn_command_on_a_trained_checkpoint(tmp_path):
    images = make_image_folder(tmp_path / "train_images", n=24)
    run_training(tiny_config(images, iterations=2, period=2), tmp_path / "run")
    labelled = make_image_folder(tmp_path / "labelled", n=30, classes=3, seed=1)
    out = subprocess.run(
        [sys.executable, "-m", "dino_bridge.cli", "eval", "knn", "--checkpoint", str(tmp_path / "run"),
         "--train", str(labelled), "--val", str(labelled), "--ks", "1", "5",
         "--output", str(tmp_path / "knn.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "1-NN top-1" in out.stdout
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["n_train"] == result["n_val"] == 30
    assert result["checkpoint"].endswith("ckpt/2")
    # the command reports what the library computes on the exported teacher
    from dino_bridge.data import ImageFolderDataset
    from dino_bridge.eval import eval_transform_for, extract_features, load_backbone

    model, spec = load_backbone(tmp_path / "run")
    source = ImageFolderDataset(labelled, labelled=True)
    feats, labels = extract_features(model, source, eval_transform_for(spec))
    expected = knn_accuracy(feats, labels, feats, labels, ks=(1, 5))
    assert result["top1"] == {str(k): pytest.approx(v) for k, v in expected.items()}


def test_eval_knn_names_a_bad_dataset(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dino_bridge.cli", "eval", "knn", "--checkpoint", str(tmp_path),
         "--train", "nope", "--val", "nope"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr
