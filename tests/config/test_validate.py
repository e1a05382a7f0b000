"""Every value a user can get wrong fails at load time: one line naming the key, its value and what
is allowed, before anything is built (``config/validate.py``)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import typing

import pytest

from dino_bridge.config import ConfigError, load_config, parse_overrides
from dino_bridge.config.load import SCHEMA_PATHS
from dino_bridge.config.validate import RULES
from tests.helpers import CONFIGS, REPO, SEED_YAML

# (override, the key the message must name). The seed config has patch size 16 and KoLeo on.
BAD_OVERRIDES = [
    # the cases of issue 9
    ("schedules.lr.peak=-1", "schedules.lr.peak"),
    ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu"),
    ("crops.global_crops_size=30", "crops.global_crops_size"),
    ("crops.local_crops_number=-2", "crops.local_crops_number"),
    ("dino.head_n_prototypes=0", "dino.head_n_prototypes"),
    ("dtch.cls_hist_cache=0", "dtch.cls_hist_cache"),
    ("optim.epochs=0", "optim.epochs"),
    ("checkpointing.period=0", "checkpointing.period"),
    # wrong types
    ("train.batch_size_per_gpu=many", "train.batch_size_per_gpu"),
    ("dino.loss_weight=heavy", "dino.loss_weight"),
    ("crops.rgb_mean=3", "crops.rgb_mean"),
    ("student.layerscale=abc", "student.layerscale"),
    ("optim.epochs=1.5", "optim.epochs"),
    ("dtch.enabled=maybe", "dtch.enabled"),
    ("train.seed=[1]", "train.seed"),
    ("resize_shuffle_augmentor.bridge_global_weight=fast", "resize_shuffle_augmentor.bridge_global_weight"),
    # sizes
    ("crops.local_crops_size=50", "crops.local_crops_size"),
    ("student.patch_size=0", "student.patch_size"),
    ("dino.head_hidden_dim=0", "dino.head_hidden_dim"),
    ("ibot.head_bottleneck_dim=-1", "ibot.head_bottleneck_dim"),
    ("dino.head_nlayers=0", "dino.head_nlayers"),
    ("student.n_storage_tokens=-1", "student.n_storage_tokens"),
    ("ibot.head_n_prototypes=20000000", "ibot.head_n_prototypes"),
    ("resize_shuffle_augmentor.patch_size=0", "resize_shuffle_augmentor.patch_size"),
    ("student.in_chans=1", "student.in_chans"),
    # counts
    ("train.num_workers=-1", "train.num_workers"),
    ("train.OFFICIAL_EPOCH_LENGTH=0", "train.OFFICIAL_EPOCH_LENGTH"),
    ("checkpointing.max_to_keep=-1", "checkpointing.max_to_keep"),
    ("checkpointing.keep_every=-5", "checkpointing.keep_every"),
    ("train.stop_at_iteration=0", "train.stop_at_iteration"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
    ("train.log_period=0", "train.log_period"),
    ("train.batch_size_per_gpu=1", "train.batch_size_per_gpu"),  # KoLeo needs two images
    ("dino.koleo_topk=0", "dino.koleo_topk"),
    # probabilities and ratios
    ("ibot.mask_sample_probability=1.5", "ibot.mask_sample_probability"),
    ("ibot.mask_ratio_min_max=[0.5,0.1]", "ibot.mask_ratio_min_max"),
    ("ibot.mask_ratio_min_max=[0.1,1.5]", "ibot.mask_ratio_min_max"),
    ("ibot.mask_ratio_min_max=[0.1]", "ibot.mask_ratio_min_max"),
    ("crops.global_crops_scale=[0,1]", "crops.global_crops_scale"),
    ("crops.local_crops_scale=[0.5,0.2]", "crops.local_crops_scale"),
    ("data.imagenet_1k.dataset_ratio=0", "data.imagenet_1k.dataset_ratio"),
    ("student.drop_path_rate=1.0", "student.drop_path_rate"),
    (
        "resize_shuffle_augmentor.patch_shuffle_patch_probability=-0.1",
        "resize_shuffle_augmentor.patch_shuffle_patch_probability",
    ),
    (
        "resize_shuffle_augmentor.patch_shuffle_patch_min_max=[0.3,0.1]",
        "resize_shuffle_augmentor.patch_shuffle_patch_min_max",
    ),
    ("optim.layerwise_decay=0", "optim.layerwise_decay"),
    ("optim.adamw_beta2=1.0", "optim.adamw_beta2"),
    ("optim.clip_grad=-1", "optim.clip_grad"),
    # temperatures
    ("dino.student_temp=0", "dino.student_temp"),
    ("schedules.teacher_temp.peak=0", "schedules.teacher_temp.peak"),
    ("schedules.teacher_temp.start=-0.04", "schedules.teacher_temp.start"),
    ("dtch.temp_scale=0", "dtch.temp_scale"),
    # schedule values
    ("schedules.lr.end=-1e-6", "schedules.lr.end"),
    ("schedules.lr.warmup_epochs=-1", "schedules.lr.warmup_epochs"),
    ("schedules.lr.cosine_epochs=-2", "schedules.lr.cosine_epochs"),
    ("schedules.lr.peak=.inf", "schedules.lr.peak"),
    ("schedules.momentum.end=1.5", "schedules.momentum.end"),
    ("schedules.weight_decay.peak=-0.1", "schedules.weight_decay.peak"),
    (
        "resize_shuffle_augmentor.resize_paste_loss_weight.peak=-0.5",
        "resize_shuffle_augmentor.resize_paste_loss_weight.peak",
    ),
    (
        "resize_shuffle_augmentor.patch_shuffle_loss_weight=-1",
        "resize_shuffle_augmentor.patch_shuffle_loss_weight",
    ),
    (
        "resize_shuffle_augmentor.patch_shuffle_cls_weight=-1",
        "resize_shuffle_augmentor.patch_shuffle_cls_weight",
    ),
    # DTCH parameters
    ("dtch.patch_hist_cache=-5", "dtch.patch_hist_cache"),
    ("dtch.exp_power=0", "dtch.exp_power"),
    ("dtch.boost_alpha=0", "dtch.boost_alpha"),
    ("dtch.boost_w_max=0.5", "dtch.boost_w_max"),
    ("dtch.boost_divisor=0", "dtch.boost_divisor"),
    ("dtch.boost_eps=-1", "dtch.boost_eps"),
    ("dtch.logit_clamp=100", "dtch.logit_clamp"),
    ("dtch.balance_beta=.nan", "dtch.balance_beta"),
    # choices and combinations
    ("MODEL.DEVICE=gpu", "MODEL.DEVICE"),
    ("student.arch=vit_foo", "student.arch"),
    ("student.pos_embed_rope_min_period=1", "student.pos_embed_rope_min_period"),
    ("data.imagenet_1k.demo=fashion-mnist", "data.imagenet_1k"),
    ("data.extra.demo=mnist", "data.extra.demo"),
    ("student.embed_dim=100", "student.embed_dim"),
    ("student.num_heads=5", "student.num_heads"),
    ("student.depth=0", "student.depth"),
    ("dino.koleo_gate_slope=0", "dino.koleo_gate_slope"),
    ("crops.rgb_std=[0.2,0.2,0]", "crops.rgb_std"),
    ("crops.view_pipeline=turbo", "crops.view_pipeline"),
    ("crops.jpeg_draft_min_side=-1", "crops.jpeg_draft_min_side"),
    ("teacher.momentum_teacher=2", "teacher.momentum_teacher"),
    ("dino.koleo_cls_loss_wieght=1", "dino.koleo_cls_loss_wieght"),  # unknown key
    # online evaluation
    ("evaluation.knn_period=-1", "evaluation.knn_period"),
    ("evaluation.knn_period=5", "evaluation.knn_train"),  # on, without its labelled sets
    ("evaluation.knn_k=0", "evaluation.knn_k"),
    ("evaluation.knn_temperature=0", "evaluation.knn_temperature"),
    ("evaluation.knn_limit_train=0", "evaluation.knn_limit_train"),
    ("evaluation.knn_limit_val=-3", "evaluation.knn_limit_val"),
    ("evaluation.knn_batch_size=0", "evaluation.knn_batch_size"),
    ("evaluation.knn_num_workers=-1", "evaluation.knn_num_workers"),
    ("evaluation.knn_period=often", "evaluation.knn_period"),
]

# (file content, what the message must name): malformed YAML names the file and the line.
BAD_FILES = [
    ("train:\n  seed: [1, 2\n", "line 3"),
    ("train:\n\tseed: 1\n", "line 2"),
    ("train:\n  seed: 1\n  seed: 2\n", "duplicate key seed"),
    ("x: &a 1\ny: *b\n", "undefined alias"),
    ('"unterminated\n', "line 2"),
    ("a: b: c\n", "line 1"),
    ("- 1\n- 2\n", "mapping at the top level"),
    ("train: 5\n", "'train'"),
    ("data: [1, 2]\n", "'data'"),
    ("trian:\n  seed: 1\n", "'trian'"),
    ("train:\n  seed: ${oops}\n", "'train.seed'"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
]


def _parsed_value(override: str):
    tree = parse_overrides([override])
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    return tree


def _check_message(message: str, key: str) -> None:
    assert "\n" not in message, message
    assert f"'{key}'" in message, message


def test_every_bad_input_fails_at_load_with_one_line_naming_the_key(tmp_path):
    started = time.perf_counter()
    failures = []
    for override, key in BAD_OVERRIDES:
        try:
            load_config(SEED_YAML, [override])
        except ConfigError as e:
            message = str(e)
            _check_message(message, key)
            value = _parsed_value(override)
            shown = {repr(value), str(value)} | ({"nan", "inf"} if isinstance(value, float) else set())
            if isinstance(value, float) and math.isfinite(value) and value == int(value):
                shown.add(str(int(value)))
            if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                shown.add(repr([float(v) for v in value]))
            if "unknown config key" not in message:
                assert any(s in message for s in shown), (override, message)  # the value is named
                assert any(w in message for w in ("allowed:", "valid values:", "must be")), message
        else:
            failures.append(override)
    assert not failures, f"accepted: {failures}"
    for i, (content, needle) in enumerate(BAD_FILES):
        path = tmp_path / f"bad{i}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ConfigError) as e:
            load_config(path, [])
        assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
    count = len(BAD_OVERRIDES) + len(BAD_FILES)
    print(f"\n{count} bad inputs rejected at load time in {time.perf_counter() - started:.1f} s")
    assert count >= 40


def test_the_shipped_configs_and_the_defaults_pass():
    load_config(None, [])
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_config(path, [])


def test_good_values_at_the_edges_pass():
    load_config(
        SEED_YAML,
        [
            "crops.local_crops_number=0",  # no local crops: their size need not be a multiple
            "crops.local_crops_size=7",
            "dino.koleo_cls_loss_weight=0",
            "train.batch_size_per_gpu=1",  # fine without KoLeo on the CLS
            "student.pos_embed_rope_base=null",
            "student.pos_embed_rope_min_period=0.5",
            "student.pos_embed_rope_max_period=100",
            "optim.clip_grad=0",
            "resize_shuffle_augmentor.bridge_global_weight=0.5",
            "ibot.mask_ratio_min_max=[0,1]",
            "evaluation.knn_period=1",
            "evaluation.knn_train=fashion-mnist",
            "evaluation.knn_val=fashion-mnist:test",
            "evaluation.knn_limit_train=null",
            "evaluation.knn_num_workers=0",
        ],
    )
    needed = r"'evaluation.knn_val' is None; .* while evaluation.knn_period is 1"
    with pytest.raises(ConfigError, match=needed):
        load_config(SEED_YAML, ["evaluation.knn_period=1", "evaluation.knn_train=fashion-mnist"])


NUMERIC = (int, float, list, typing.Any)


def _is_numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return any(a in NUMERIC or typing.get_origin(a) is list for a in args)


# Numeric/list/Any keys without a value rule: each one is refused by config.features when set.
FEATURE_CHECKED = {"train.chunk_schedule", "crops.resize_shuffle_augmentor_switch"}


def test_every_numeric_key_has_a_rule_and_every_rule_a_key():
    """A new numeric key needs its line in validate.RULES (or a reason to be in FEATURE_CHECKED)."""
    unruled = [
        key
        for key, tp in SCHEMA_PATHS.items()
        if _is_numeric(tp) and key not in RULES and key not in FEATURE_CHECKED
    ]
    assert not unruled, f"numeric config keys without a rule in config/validate.py: {unruled}"
    stale = [
        key
        for key in RULES
        if key not in SCHEMA_PATHS and not any(p.startswith(key + ".") for p in SCHEMA_PATHS)
    ]
    assert not stale, f"config/validate.py has rules for keys the schema lacks: {stale}"


def _cases(tmp_path):
    smoke = str(CONFIGS / "smoke_cpu.yaml")
    out_dir = tmp_path / "run"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  seed: [1, 2\n")
    train = ["--config-file", smoke, "--output-dir"]
    return out_dir, {
        "negative-lr": ([*train, str(out_dir), "schedules.lr.peak=-1"], "schedules.lr.peak"),
        "period-zero": ([*train, str(out_dir), "checkpointing.period=0"], "checkpointing.period"),
        "malformed-yaml": (["--config-file", str(bad_yaml), "--output-dir", str(out_dir)], str(bad_yaml)),
        "output-dir-is-a-file": ([*train, str(blocker)], str(blocker)),
        "output-dir-uncreatable": ([*train, str(blocker / "run")], str(blocker / "run")),
    }


def _one_error_line(stderr: str, key: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and key in errors[0], stderr[-2000:]


@pytest.mark.parametrize("case", ["negative-lr", "malformed-yaml", "output-dir-is-a-file"])
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, case):
    out_dir, cases = _cases(tmp_path)
    args, key = cases[case]
    out = subprocess.run(
        [sys.executable, "-m", "dino_bridge.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    _one_error_line(out.stderr, key)
    if case != "output-dir-is-a-file":
        assert not out_dir.exists()  # refused at load: no run dir, no model


def test_train_main_exits_2_for_every_cli_case(tmp_path, capsys):
    """The same cases in-process (the subprocess test above runs three of them for real)."""
    from dino_bridge.train.args import main

    out_dir, cases = _cases(tmp_path)
    for case, (args, key) in cases.items():
        assert main(args) == 2, case
        _one_error_line(capsys.readouterr().err, key)
    assert not out_dir.exists()
