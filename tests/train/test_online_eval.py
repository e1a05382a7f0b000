"""The online kNN during training (``evaluation.*``, train/online_eval.py): its figures equal the
offline ``eval knn`` of the same teacher, appear at the evaluation iterations of a real run without
changing its losses, and a failure switches it off with one log line while training goes on."""

from __future__ import annotations

import pytest

from dino_bridge.config import ConfigError
from dino_bridge.eval.features import random_backbone
from dino_bridge.eval.run_knn import knn_eval
from dino_bridge.train import build
from dino_bridge.train.online_eval import build_online_knn, split_across_ranks
from tests.helpers import LOSS_KEYS, make_image_folder, read_metrics, run_training, tiny_config

FAST = ["dtch.enabled=false", "train.log_period=3"]  # no DTCH warm-up; log at 0, 2, 3 (and evaluations)


def knn_overrides(train, val, period: int = 2, batch_size: int = 4) -> list[str]:
    return [
        f"evaluation.knn_period={period}",
        f"evaluation.knn_train={train}",
        f"evaluation.knn_val={val}",
        "evaluation.knn_k=5",
        "evaluation.knn_limit_train=20",  # a seeded subset of the 24 images, as eval knn --limit-train
        f"evaluation.knn_batch_size={batch_size}",
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), n=24)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return make_image_folder(root / "train", n=24, classes=3), make_image_folder(
        root / "val", n=11, classes=3, seed=1
    )


def test_split_gives_every_rank_the_same_number_of_forward_calls():
    import numpy as np

    indices = np.arange(9) * 10
    parts = [split_across_ranks(indices, r, 2, batch_size=4) for r in range(2)]
    assert [list(p) for p, _ in parts] == [[0, 20, 40, 60, 80], [10, 30, 50, 70]]
    assert [b for _, b in parts] == [2, 2]  # rank 1 needs one batch: it pads the second
    assert split_across_ranks(indices[:1], 1, 2, batch_size=4)[1] == 1  # an empty part still calls once


def test_online_knn_equals_eval_knn_of_the_same_backbone(images, labelled):
    # no LayerScale: at its 1e-5 init every image has nearly the same CLS feature, and which
    # neighbours win then hangs on the last bits of a batch's arithmetic
    no_layerscale = ["student.layerscale=null"]
    cfg = tiny_config(images, extra=FAST + no_layerscale + knn_overrides(*labelled, batch_size=3))
    spec = build.backbone_spec(cfg)
    backbone = random_backbone(spec, seed=3).train()  # as the teacher's module may be
    knn = build_online_knn(cfg, device="cpu")
    figures = knn(backbone, iteration=1)
    assert backbone.training  # put back in the mode it was in
    offline = knn_eval(
        random_backbone(spec, seed=3), spec, str(labelled[0]), str(labelled[1]), ks=(5,), limit_train=20
    )
    assert offline["n_train"] == 20 and offline["n_val"] == 11
    assert figures["knn/top1"] == pytest.approx(offline["top1"]["5"])
    assert figures["knn/top5"] == 100.0  # 3 classes
    assert figures["knn/seconds"] > 0


@pytest.fixture(scope="module")
def knn_run(images, labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("knn_run")
    run_training(tiny_config(images, iterations=4, period=100, extra=FAST + knn_overrides(*labelled)), out)
    return out


def test_figures_are_logged_at_the_evaluation_iterations(knn_run):
    records = {r["iteration"]: r for r in read_metrics(knn_run)}
    assert sorted(records) == [0, 1, 2, 3]  # 1 is logged for its evaluation (log_period 3)
    with_knn = sorted(it for it, r in records.items() if "knn/top1" in r)
    assert with_knn == [1, 3]  # (it + 1) % knn_period == 0
    for it in with_knn:
        assert 0 <= records[it]["knn/top1"] <= records[it]["knn/top5"] == 100.0
    log = (knn_run / "train.log").read_text()
    assert log.count("| knn top1=") == 2 and "failed" not in log


def test_a_failing_evaluation_is_switched_off_once_and_changes_no_loss(images, labelled, knn_run, tmp_path):
    """val has a class the train images lack: the first evaluation fails, the run goes on."""
    bad_val = make_image_folder(tmp_path / "val", n=8, classes=4, seed=2)  # class_3 is not in train
    cfg = tiny_config(images, iterations=4, period=100, extra=FAST + knn_overrides(labelled[0], bad_val))
    summary = run_training(cfg, tmp_path / "run")
    assert summary["checkpoint"].endswith("ckpt/4")
    records = read_metrics(tmp_path / "run")
    assert not any(k.startswith("knn/") for r in records for k in r)
    log = (tmp_path / "run" / "train.log").read_text()
    failures = [line for line in log.splitlines() if "online kNN" in line]
    assert len(failures) == 1, failures
    assert "failed at iteration 1 on rank 0, switched off" in failures[0] and "class_3" in failures[0]
    # the evaluations of the other run changed nothing in its training: same losses, bit for bit
    with_knn = {r["iteration"]: [r[k] for k in LOSS_KEYS] for r in read_metrics(knn_run)}
    assert {r["iteration"]: [r[k] for k in LOSS_KEYS] for r in records} == with_knn


def test_a_missing_folder_is_a_config_error_before_anything_is_built(images, labelled, tmp_path):
    missing = tmp_path / "no_such_folder"
    cfg = tiny_config(images, extra=FAST + knn_overrides(labelled[0], missing))
    with pytest.raises(ConfigError, match=r"evaluation.knn_val: .*no_such_folder.* neither an image folder"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # a demo dataset spec passes the start-up check (its files are read at the first evaluation)
    demo = tiny_config(images, extra=knn_overrides("fashion-mnist", "fashion-mnist:test"))
    assert build.config_problems(demo) == []
