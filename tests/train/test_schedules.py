import math

import numpy as np
import pytest

from dino_bridge.config import load_config
from dino_bridge.train.build import build_schedules
from dino_bridge.train.schedules import (
    ScheduleSpec,
    build_schedule,
    loss_weight_factor,
    lr_scale,
    warmup_cosine,
)
from tests.helpers import SEED_YAML


def test_warmup_then_cosine_shape_and_endpoints():
    s = warmup_cosine(0.0, 1.0, 0.1, warmup_iters=4, total_iters=14)
    assert len(s) == 14
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])  # end point excluded
    assert s[4] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)  # cosine end points included
    u = 3 / 9
    assert s[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u)))
    assert np.all(np.diff(s[4:]) <= 0)


def test_cosine_epochs_then_constant_tail():
    s = build_schedule(
        ScheduleSpec(0, 1, 0.5, warmup_epochs=1, cosine_epochs=2), epoch_length=10, total_iters=50
    )
    assert s[10] == pytest.approx(1.0) and s[29] == pytest.approx(0.5)
    np.testing.assert_allclose(s[30:], 0.5)


def test_scaling_rules():
    assert lr_scale("sqrt_wrt_1024", 1024) == pytest.approx(4.0)
    assert lr_scale("sqrt_wrt_1024", 64) == pytest.approx(1.0)
    assert lr_scale("linear_wrt_256", 512) == pytest.approx(2.0)
    assert lr_scale("none", 4096) == 1.0
    with pytest.raises(ValueError, match="valid"):
        lr_scale("cubic", 64)


def test_seed_schedules_at_the_seed_scale():
    cfg = load_config(SEED_YAML, ["optim.epochs=200"])
    sched = build_schedules(cfg, world_size=8)  # 8 × 64 = 512 images: lr × 4·sqrt(0.5)
    scale = 4 * math.sqrt(512 / 1024)
    assert sched.lr[0] == 0.0
    assert sched.lr[1000] == pytest.approx(5e-5 * scale)  # warm-up over 1 epoch of 1000 iterations
    assert sched.lr[-1] == pytest.approx(5e-6 * scale)
    assert np.all(sched.last_layer_lr[:1000] == 0) and sched.last_layer_lr[1000] == sched.lr[1000]
    assert sched.teacher_temp[0] == pytest.approx(0.04) and sched.teacher_temp[100_000] == pytest.approx(0.07)
    np.testing.assert_allclose(sched.momentum, 0.994)
    np.testing.assert_allclose(sched.weight_decay, 0.04)
    assert sched.at(10**9)["lr"] == pytest.approx(sched.lr[-1])  # past the end: the last value


def test_aux_weights_stay_zero_for_zero_epochs_then_ramp():
    cfg = load_config(SEED_YAML, [])
    rp = loss_weight_factor(cfg.resize_shuffle_augmentor.resize_paste_loss_weight, 1000, 1_000_000)
    assert rp[50_000] == 0.0 and rp[50_001] == pytest.approx(0.5 / 50_000)
    assert rp[100_000] == pytest.approx(0.5) and rp[-1] == pytest.approx(0.5)
    assert np.all(rp[:50_001] == 0)


def test_a_number_stays_a_constant_factor():
    assert loss_weight_factor(0.25, 10, 100) == 0.25
