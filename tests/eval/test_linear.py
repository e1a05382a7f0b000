"""The linear probe: its objective and gradient, the choice of λ on the train set only, agreement
with scikit-learn on Fashion-MNIST pixels, the probe features, and ``dino-bridge eval linear``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dino_bridge.eval.linear import (
    _loss_and_gradients,
    choose_l2,
    feature_stats,
    fit_logistic,
    holdout_split,
    linear_probe,
    probe_scores,
    topk_accuracy,
)


def _clusters(n, seed, classes=4, dim=16, noise=1.2):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, classes, (n,), generator=g)
    # an offset and uneven scales: the standardisation has something to do
    x = 5.0 + (centers[labels] + noise * torch.randn(n, dim, generator=g)) * torch.linspace(0.1, 3, dim)
    return x, labels


def test_the_gradient_is_autograds_and_chunking_or_rows_do_not_change_it():
    x, y = _clusters(50, 0)
    rows = torch.tensor([3, 7, 8, 20, 21, 22, 40, 49])
    mean, std = feature_stats(x, rows)
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(16, 4, generator=g), torch.randn(4, generator=g)
    l2 = 0.3
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    z = (x[rows] - mean) / std
    oracle = torch.nn.functional.cross_entropy(z @ w + b, y[rows]) + 0.5 * l2 * w.square().sum()
    oracle.backward()
    for chunk in (3, 100):
        loss, grad_w, grad_b = _loss_and_gradients((weight, bias), x, y, rows, l2, (mean, std), chunk, "cpu")
        torch.testing.assert_close(loss, oracle.detach())
        torch.testing.assert_close(grad_w, w.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_b, b.grad, rtol=1e-4, atol=1e-5)
    # the scores use the same folded standardisation
    probe = fit_logistic(x, y, 4, l2, rows=rows, max_iter=1)
    torch.testing.assert_close(probe_scores(probe, x, rows), (z @ probe.weight + probe.bias).detach())


def test_feature_stats_and_a_constant_feature():
    x = torch.cat([torch.randn(100, 3) * 2 + 1, torch.full((100, 1), 7.0)], dim=1)
    mean, std = feature_stats(x, chunk_rows=7)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(std[:3], x[:, :3].std(0, unbiased=False))
    assert std[3] == 1.0  # standardises to 0 instead of dividing by 0


def test_labels_outside_the_classes_and_a_non_positive_strength_are_named():
    x, y = _clusters(20, 0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got 0..3"):
        fit_logistic(x, y, 3, 0.1)
    with pytest.raises(ValueError, match="the L2 strength must be > 0"):
        fit_logistic(x, y, 4, 0.0)


def test_the_held_out_split_is_seeded_stratified_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 1)
    fit, held = holdout_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(81))
    assert np.bincount(labels[held].numpy(), minlength=3).tolist() == [10, 6, 0]  # a single row stays in
    again, other = holdout_split(labels, 0.2, seed=0), holdout_split(labels, 0.2, seed=1)
    assert torch.equal(again[1], held) and not torch.equal(other[1], held)
    with pytest.raises(ValueError, match="holdout_fraction must be in"):
        holdout_split(labels, 1.0, seed=0)


def test_the_probe_never_reads_test_labels():
    train_x, train_y = _clusters(400, 0)
    test_x, test_y = _clusters(200, 1)
    grid = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
    result, probe = linear_probe(train_x, train_y, test_x, test_y, 4, grid, patience=None, max_iter=200)
    shuffled = test_y[torch.randperm(200, generator=torch.Generator().manual_seed(3))]
    result_s, probe_s = linear_probe(train_x, train_y, test_x, shuffled, 4, grid, patience=None, max_iter=200)
    assert result_s["l2"] == result["l2"] and result_s["heldout_top1"] == result["heldout_top1"]
    assert torch.equal(probe_scores(probe_s, train_x).argmax(1), probe_scores(probe, train_x).argmax(1))
    assert torch.equal(probe_s.weight, probe.weight)
    # ... while the score is computed against the labels given: the shuffled ones are near chance
    assert result["top1"] > 80 and result_s["top1"] < 50
    assert result["top5"] == 100.0  # 4 classes: top-5 always holds
    assert result["sklearn_C"] == pytest.approx(1 / (result["l2"] * 400))


def test_choose_l2_keeps_the_stronger_strength_on_a_tie_and_stops_with_patience():
    x, y = _clusters(200, 2, noise=0.01)  # separable: every strength scores 100 % on the held-out rows
    l2, scores, probe = choose_l2(x, y, 4, (1e-3, 1e-1, 1e-2), patience=None, max_iter=50)
    assert scores == {1e-1: 100.0, 1e-2: 100.0, 1e-3: 100.0} and l2 == probe.l2 == 1e-1
    l2, scores, _ = choose_l2(x, y, 4, (1e-1, 1e-2, 1e-3, 1e-4), patience=2, max_iter=50)
    assert list(scores) == [1e-1, 1e-2, 1e-3]  # two strengths without improvement: the sweep stops
    with pytest.raises(ValueError, match="positive strengths"):
        choose_l2(x, y, 4, (0.1, -1.0))


def test_top1_is_within_one_point_of_sklearn_on_fashion_mnist_pixels():
    from sklearn.linear_model import LogisticRegression

    from dino_bridge.data import FashionMNIST

    def pixels(split, n, seed):
        source = FashionMNIST(split)
        rows = np.sort(np.random.default_rng(seed).permutation(len(source))[:n])
        x = torch.from_numpy(source.images[rows].reshape(n, -1).astype(np.float32) / 255)
        return x, torch.tensor(source.labels)[rows]

    train_x, train_y = pixels("train", 2000, 0)
    test_x, test_y = pixels("test", 1000, 1)
    C = 0.05  # λ = 1 / (C·N) = 0.01, the strength choose_l2 picks on this split
    ours = fit_logistic(train_x, train_y, 10, 1 / (C * 2000), max_iter=1000)
    our_top1 = topk_accuracy(ours, test_x, test_y, (1,))[1]
    mean, std = feature_stats(train_x)
    reference = LogisticRegression(C=C, max_iter=1000).fit(((train_x - mean) / std).numpy(), train_y.numpy())
    sklearn_top1 = 100 * float((reference.predict(((test_x - mean) / std).numpy()) == test_y.numpy()).mean())
    print(f"FMNIST pixels, 2000 train / 1000 test, C={C}: ours {our_top1:.2f}%, sklearn {sklearn_top1:.2f}%")
    assert abs(our_top1 - sklearn_top1) <= 1.0
    assert our_top1 > 75  # a real classifier (chance is 10 %)


def test_probe_features_are_blocks_of_normed_cls_and_the_mean_patch():
    from dino_bridge.eval.features import cls_embedding
    from dino_bridge.eval.run_linear import probe_embedding
    from dino_bridge.models import build_vit

    model = build_vit("vit_tiny", embed_dim=32, depth=4, num_heads=2, patch_size=8, n_storage_tokens=1)
    torch.manual_seed(0)
    model.init_weights()
    model.eval()
    images = torch.randn(3, 3, 16, 16)
    out = probe_embedding("cls+avgpool", 4)(model, images)
    layers = model.get_intermediate_layers(images, n=4, return_class_token=True)
    expected = torch.cat([cls for _, cls in layers] + [layers[-1][0].mean(1)], dim=1)
    assert out["linear"].shape == (3, 5 * 32) and torch.equal(out["linear"], expected)
    torch.testing.assert_close(out["cls"], cls_embedding(model, images)["cls"])  # the kNN feature
    cls_only = probe_embedding("cls", 1)(model, images)["linear"]
    torch.testing.assert_close(cls_only, model(images))
    with pytest.raises(ValueError, match="unknown linear-probe features 'patch'"):
        probe_embedding("patch")
    with pytest.raises(ValueError, match="blocks must be a positive number"):
        probe_embedding("cls", 0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.helpers import make_image_folder, run_training, tiny_config

    root = tmp_path_factory.mktemp("linear")
    run_training(tiny_config(make_image_folder(root / "images", n=24), iterations=2, period=2), root / "run")
    make_image_folder(root / "labelled", n=30, classes=3, seed=1)
    return root


def test_eval_linear_command_writes_its_json_next_to_the_checkpoint(checkpoint, capsys):
    from dino_bridge import cli
    from dino_bridge.eval import load_backbone
    from dino_bridge.eval.run_linear import linear_eval

    labelled = str(checkpoint / "labelled")
    argv = ["eval", "linear", "--checkpoint", str(checkpoint / "run"), "--train", labelled, "--val", labelled,
            "--l2-grid", "1e-1", "1e-3", "--max-iter", "50", "--blocks", "4"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "top-1: " in out and "top-5: " in out and "held-out part of the train images" in out
    written = checkpoint / "run" / "ckpt" / "2" / "linear_results.json"
    result = json.loads(written.read_text())
    assert (result["n_train"], result["n_test"], result["num_classes"]) == (30, 30, 3)
    assert result["features"] == "cls+avgpool" and result["blocks"] == 4
    assert result["checkpoint"].endswith("ckpt/2") and set(result["heldout_top1"]) <= {"0.1", "0.001"}
    # the command reports what the library computes on the exported teacher
    model, spec = load_backbone(checkpoint / "run")
    expected = linear_eval(model, spec, labelled, labelled, blocks=4, grid=(1e-1, 1e-3), max_iter=50)
    assert result["top1"] == pytest.approx(expected["top1"]) and result["l2"] == expected["l2"]
    assert result["feature_dim"] == expected["feature_dim"] == 5 * model.embed_dim  # 4 CLS + mean patch


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train", "nope"], "neither an image folder nor a demo dataset"),
        (["--l2-grid", "0.1", "-1"], "positive strengths"),
        (["--holdout-fraction", "1.5"], "holdout_fraction must be in"),
        (["--max-iter", "0"], "max_iter must be >= 1"),
    ],
)
def test_eval_linear_bad_inputs_exit_2_with_one_line(checkpoint, capsys, monkeypatch, extra, message):
    import logging

    from dino_bridge import cli

    labelled = str(checkpoint / "labelled")
    argv = ["eval", "linear", "--checkpoint", str(checkpoint / "run"), "--train", labelled, "--val", labelled]
    # an earlier in-process training leaves the console log set up: the error must still be one line
    monkeypatch.setattr(logging.getLogger("dino_bridge"), "handlers", [logging.NullHandler()])
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_eval_linear_refuses_a_block_count_other_than_1_or_4(checkpoint):
    from dino_bridge import cli

    with pytest.raises(SystemExit) as exit_info:  # argparse: exit status 2
        cli.main(["eval", "linear", "--checkpoint", str(checkpoint), "--train", "x", "--val", "y",
                  "--blocks", "3"])  # fmt: skip
    assert exit_info.value.code == 2
