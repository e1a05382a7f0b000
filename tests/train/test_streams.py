"""The invariance streams in the real trainer: every term, cost only when used, the frozen head,
exact resume across the switch-on point, checkpoints without a bridge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_bridge.config import ConfigError, load_config
from dino_bridge.distributed.device import Runtime
from dino_bridge.models.vit import DinoVisionTransformer
from dino_bridge.train import build
from dino_bridge.train import feed as feed_module
from tests.helpers import (
    CONFIGS,
    LOSS_KEYS,
    golden_threads,
    make_image_folder,
    read_metrics,
    run_training,
    tiny_config,
)
from tests.train.stream_helpers import bridge_gradient_probe, stream_config, stream_overrides

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_run_losses.json"
AUX_TERMS = (
    "aug/resize_paste_cls_loss",
    "aug/patchshuffle_cls_loss",
    "aug/patchshuffle_patch_loss",
    "aug/bridge_global_loss",
    "aug/bridge_patchshuffle_loss",
)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), n=24)


def _count_forwards(monkeypatch) -> list[int]:
    """Record the number of crop sets of every backbone call (teacher and student)."""
    calls: list[int] = []
    original = DinoVisionTransformer.forward_features

    def counted(self, x, masks=None, local_crops=False):
        calls.append(1 if torch.is_tensor(x) else len(x))
        return original(self, x, masks, local_crops)

    monkeypatch.setattr(DinoVisionTransformer, "forward_features", counted)
    return calls


def test_streams_with_zero_weights_cost_nothing_and_keep_the_golden_losses(images, tmp_path, monkeypatch):
    """SSLResizeShuffle, the augmentor on, the reference's constant factors (1.0), every effective
    weight 0: no extra forward, no invariance view built, the golden losses unchanged."""
    golden = json.loads(GOLDEN.read_text())
    weights = {k: 0.0 for k in ("resize_paste_loss_weight", "patch_shuffle_loss_weight")}
    weights |= {"bridge_global_weight": 0.0, "bridge_patchshuffle_weight": 0.0}
    weights |= {"patch_shuffle_patch_weight": 1.0, "patch_shuffle_cls_weight": 1.0}
    extra = golden["overrides"] + stream_overrides(weights)
    cfg = tiny_config(images, iterations=golden["iterations"], period=100, extra=extra)
    calls = _count_forwards(monkeypatch)
    built = []
    original_start = feed_module.BatchFeed.start

    def start(self, iteration):
        original_start(self, iteration)
        built.append(self.kinds)

    monkeypatch.setattr(feed_module.BatchFeed, "start", start)
    with golden_threads():
        run_training(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    for it, expected in enumerate(golden["losses"]):
        got = [records[it][k] for k in LOSS_KEYS]
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6, err_msg=f"iteration {it}")
    assert built == [frozenset()]  # one loader, no invariance views
    # warm-up teacher passes (1 crop set), then per step 1 teacher (global) + 1 student (global, local)
    steps = golden["iterations"]
    warmup = len(calls) - 2 * steps
    assert calls == [1] * warmup + [1, 2] * steps
    assert not any(k.startswith("aug/") and not k.endswith("_weight") for k in records[-1])
    assert all(records[-1][f"{name}_weight"] == 0.0 for name in AUX_TERMS)
    assert "bridge_grad_norm" not in records[-1]  # no bridge exists


def test_every_stream_term_trains_finite(images, tmp_path, monkeypatch):
    calls = _count_forwards(monkeypatch)
    run_training(stream_config(images, iterations=4), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    for record in records:
        for name in (*AUX_TERMS, "total_loss"):
            assert math.isfinite(record[name]), (name, record["iteration"])
        assert record["aug/patchshuffle_patch_tokens"] == 3  # 2 of 4 images: ⌊16·0.1⌋ + ⌊16·0.15⌋
        assert record["aug/resize_paste_cls_loss_weight"] == 0.5
        assert record["aug/patchshuffle_cls_loss_weight"] == 1.0
        assert record["aug/bridge_global_loss_weight"] == 0.25
        for instance in ("resize_paste_r", "raw_cls_o", "patchshuffle_patch_r", "dino_cls"):
            assert f"dtch/{instance}/history_entropy" in record
    assert records[-1]["bridge_grad_norm"] > 0
    # the total is Σ weight · term
    last = records[-1]
    total = sum(last[k] * last[f"{k}_weight"] for k in (*LOSS_KEYS[:-1], *AUX_TERMS))
    assert total == pytest.approx(last["total_loss"], rel=1e-5)
    # per step: teacher [global, raw_r, raw_o], student [global, local, resizepaste ×2, shift ×2]
    assert calls[-2:] == [3, 6]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "teacher targets" in log


def test_bridge_gate_closed_skips_the_bridge(images, tmp_path):
    cfg = tiny_config(
        images, iterations=2, period=100, extra=stream_overrides(gate="0.001")
    )  # the iBOT loss is far above 0.001
    run_training(cfg, tmp_path / "run")
    record = read_metrics(tmp_path / "run")[-1]
    assert "aug/bridge_global_loss" not in record and record["aug/bridge_global_loss_weight"] == 0.0
    assert "aug/patchshuffle_cls_loss" in record
    assert "bridge_grad_norm" not in record


def test_frozen_head_gets_no_bridge_gradient_while_backbone_and_bridge_learn(images, tmp_path):
    weights = {"bridge_global_weight": 0.25, "bridge_patchshuffle_weight": 0.25}
    cfg = stream_config(images, weights, extra=["student.drop_path_rate=0.0"])
    probe = bridge_gradient_probe(cfg, Runtime(torch.device("cpu"), None, 0, 1, 0), tmp_path)
    _assert_frozen_head(probe)


def _assert_frozen_head(probe: dict) -> None:
    diff, scale, _ = probe["dino_head"]
    assert diff <= 1e-5 * scale, probe  # the same with and without the bridge terms
    diff, scale, _ = probe["ibot_head"]
    assert diff <= 1e-5 * scale, probe
    diff, scale, _ = probe["backbone"]
    assert diff > 1e-3 * scale, probe  # the bridge terms reach the backbone
    _, scale, kept = probe["bridge"]
    assert scale > 0 and kept == 0, probe  # only the bridge terms train the bridge


def _probe_rank(rank, world, images, out):
    cfg = stream_config(
        images,
        {"bridge_global_weight": 0.25, "bridge_patchshuffle_weight": 0.25},
        extra=[
            "student.drop_path_rate=0.0",
            "compute_precision.param_dtype=fp32",
            "compute_precision.parallel=fsdp",
        ],
    )
    return bridge_gradient_probe(cfg, Runtime(torch.device("cpu"), "gloo", rank, world, rank), out)


def test_frozen_head_under_fsdp2_on_two_ranks(images, tmp_path):
    from tests.distributed_utils import spawn

    for probe in spawn(_probe_rank, 2, images, tmp_path):
        _assert_frozen_head(probe)


def _losses(records) -> dict[int, list[float]]:
    return {r["iteration"]: [r.get(k) for k in ("total_loss", *AUX_TERMS)] for r in records}


def test_a_checkpoint_without_streams_or_bridge_resumes_into_a_run_with_them(images, tmp_path):
    off = {k: 0.0 for k in ("resize_paste_loss_weight", "patch_shuffle_loss_weight")}
    off |= {"bridge_global_weight": 0.0, "bridge_patchshuffle_weight": 0.0}
    run_training(
        stream_config(images, off, iterations=4, extra=["train.stop_at_iteration=2"]), tmp_path / "run"
    )
    state = torch.load(tmp_path / "run/ckpt/2/trainer_state.pt", weights_only=False)
    assert set(state["assigners"]) == {"dino_cls", "ibot_patch"} | {
        f"{k}_{s}" for k in ("resize_paste", "raw_cls", "patchshuffle_patch") for s in "ro"
    }
    from dino_bridge.train.checkpoint import saved_keys

    assert not any(k.startswith("student.bridge") for k in saved_keys(tmp_path / "run/ckpt/2"))
    run_training(stream_config(images, iterations=4), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert all(math.isfinite(records[3][k]) for k in AUX_TERMS)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "has no bridge: starting from its initialisation" in log
    assert "resuming from" in log


def test_config_interactions_fail_at_load_time(images):
    on = stream_overrides()
    with pytest.raises(ConfigError, match="crops.use_resize_shuffle_augmentor"):
        build.check_config(tiny_config(images, extra=[*on, "crops.use_resize_shuffle_augmentor=false"]))
    with pytest.raises(ConfigError, match="MODEL.META_ARCHITECTURE.*SSLResizeShuffle"):
        build.check_config(tiny_config(images, extra=[*on, "MODEL.META_ARCHITECTURE=SSLMetaArch"]))
    with pytest.raises(ConfigError, match="resize_shuffle_augmentor.patch_size"):
        build.check_config(tiny_config(images, extra=[*on, "resize_shuffle_augmentor.patch_size=8"]))
    with pytest.raises(ConfigError, match="crops.resize_shuffle_augmentor_switch"):
        build.check_config(tiny_config(images, extra=["crops.resize_shuffle_augmentor_switch={}"]))
    with pytest.raises(ConfigError, match="bridge_ibot_gate"):
        build.check_config(tiny_config(images, extra=[*stream_overrides(gate="4.0"), "ibot.loss_weight=0"]))
    with pytest.raises(ConfigError, match="no patch is aligned"):
        build.check_config(
            tiny_config(images, extra=[*on, "resize_shuffle_augmentor.patch_shuffle_patch_probability=0.1"])
        )
    build.check_config(tiny_config(images, extra=on))  # the valid one passes
    # the seed config: its streams need SSLResizeShuffle, which it has
    build.check_config(load_config(CONFIGS / "dinov3_vitlarge_pretrain.yaml", []))


def test_dtch_with_zero_rows_everywhere_names_the_instance():
    from dino_bridge.assign import DTCH

    with pytest.raises(ValueError, match="DTCH patchshuffle_patch_r: called with zero rows"):
        DTCH(8, 16, name="patchshuffle_patch_r")(torch.zeros(0, 8), 0.1)
