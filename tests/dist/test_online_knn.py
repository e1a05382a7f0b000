"""The online kNN on a CPU gloo mesh of 2 ranks with an FSDP2-sharded teacher: the same features and
figures as one process on the same data, and a failure on one rank switches it off on both, without
a hang."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed_utils import spawn
from tests.helpers import make_image_folder, read_metrics, tiny_config

FSDP = ["compute_precision.param_dtype=fp32", "compute_precision.parallel=fsdp", "dtch.enabled=false"]


def _knn(train, val, period: int = 2) -> list[str]:
    return [
        f"evaluation.knn_period={period}",
        f"evaluation.knn_train={train}",
        f"evaluation.knn_val={val}",
        "evaluation.knn_k=5",
        "evaluation.knn_batch_size=4",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_knn")
    images = make_image_folder(root / "images", n=24)
    train = make_image_folder(root / "train", n=17, classes=3)
    val = make_image_folder(root / "val", n=8, classes=3, seed=1)
    (val / "class_1" / "broken.png").write_bytes(b"not a png")  # skipped by the rank that reads it
    # Batches of 4: train 9 + 8 images per rank, 3 forwards each (rank 1's last one a padding batch);
    # val 5 + 4 (the broken one among rank 1's), 2 forwards each (rank 1's second a padding batch).
    return images, train, val


def _sharded_eval(rank, world, images, train, val, out):
    from dino_bridge.distributed.device import Runtime
    from dino_bridge.train.checkpoint import full_state_dict
    from dino_bridge.train.loop import build_run
    from dino_bridge.train.online_eval import build_online_knn

    # layerscale null: at LayerScale's 1e-5 init all CLS features nearly coincide (see the 1-process test)
    cfg = tiny_config(images, extra=FSDP + ["student.layerscale=null"] + _knn(train, val))
    run = build_run(cfg, Runtime(torch.device("cpu"), "gloo", rank, world, rank), out)
    assert run.plan.fsdp
    backbone = run.teacher["backbone"]
    knn = build_online_knn(cfg, torch.device("cpu"))
    figures = knn(backbone, iteration=1)
    feats, labels = knn.features(backbone, knn.parts["val"], iteration=1)
    state = full_state_dict(backbone)  # collective; the full copy is on rank 0
    return {
        "figures": figures,
        "val_feats": feats,
        "val_labels": labels,
        "state": state if rank == 0 else None,
    }


def test_sharded_online_knn_equals_one_process(data, tmp_path):
    from dino_bridge.train import build
    from dino_bridge.train.online_eval import build_online_knn

    images, train, val = data
    results = spawn(_sharded_eval, 2, images, train, val, tmp_path, timeout=240)
    tops = [{k: v for k, v in r["figures"].items() if k.startswith("knn/top")} for r in results]
    assert tops[0] == tops[1] and len(tops[0]) == 2  # every rank computes the same figures
    cfg = tiny_config(images, extra=FSDP + ["student.layerscale=null"] + _knn(train, val))
    backbone = build.build_backbone(build.backbone_spec(cfg))
    backbone.load_state_dict(results[0]["state"])
    one = build_online_knn(cfg, torch.device("cpu"))
    figures = one(backbone, iteration=1)
    feats, labels = one.features(backbone, one.parts["val"], iteration=1)
    assert feats.shape[0] == 8  # the broken image skipped, once, wherever it was read
    for rank in (0, 1):
        assert torch.equal(results[rank]["val_labels"], labels)  # dataset order restored
        torch.testing.assert_close(results[rank]["val_feats"], feats, rtol=1e-5, atol=1e-6)
    for key in ("knn/top1", "knn/top5"):
        assert results[0]["figures"][key] == pytest.approx(figures[key]), key
    assert 0 < figures["knn/top1"] < 100  # a real figure, not a degenerate one


def _train_rank(rank, world, images, train, val, out):
    """A real 2-rank run; rank 1 cannot read the labelled images at the second evaluation."""
    from dino_bridge.distributed.device import Runtime
    from dino_bridge.train import online_eval
    from dino_bridge.train.loop import train as train_run

    if rank == 1:
        original, calls = online_eval.OnlineKnn.__call__, {"n": 0}

        def failing_from_the_second(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:

                def unreadable(item_self, i):
                    raise OSError("labels.csv: unreadable (injected on rank 1)")

                online_eval._Positioned.__getitem__ = unreadable
            return original(self, *args, **kwargs)

        online_eval.OnlineKnn.__call__ = failing_from_the_second
    cfg = tiny_config(images, iterations=4, period=100, extra=FSDP + _knn(train, val, period=1))
    summary = train_run(cfg, Runtime(torch.device("cpu"), "gloo", rank, world, rank), out)
    return json.loads(json.dumps(summary, default=str))


def test_a_failure_on_one_rank_switches_it_off_on_both(data, tmp_path):
    images, train, val = data
    out = tmp_path / "run"
    summaries = spawn(_train_rank, 2, images, train, val, out, timeout=240)  # a hang fails here
    assert all(s["checkpoint"].endswith("ckpt/4") for s in summaries)
    assert len(set(summaries[0]["param_checksums"])) == 1
    records = {r["iteration"]: r for r in read_metrics(out)}
    assert sorted(records) == [0, 1, 2, 3]
    assert sorted(it for it, r in records.items() if "knn/top1" in r) == [0]  # 1 failed, then off
    failures = [line for line in (out / "train.log").read_text().splitlines() if "online kNN" in line]
    assert len(failures) == 1, failures
    assert "failed at iteration 1 on rank 1, switched off" in failures[0] and "injected" in failures[0]
