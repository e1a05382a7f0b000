import json
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from dino_bridge.config import ConfigError, load_config, save_config
from dino_bridge.config.features import find_problems
from tests.helpers import REPO, SEED_YAML

# SHA-256 of the user's seed config as handed over (shared/seed/dinov3_vitlarge_pretrain.yaml):
# recorded here so that the check needs nothing outside the repository.
USERS_SEED_SHA256 = "b8604403112d5a23e63f0f7f8ea3fe5c1436e949894d36715cff16300ff46195"


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_shipped_seed_config_is_the_users_file():
    import hashlib

    assert hashlib.sha256(SEED_YAML.read_bytes()).hexdigest() == USERS_SEED_SHA256


def test_seed_yaml_loads_with_every_key_and_value():
    cfg = load_config(SEED_YAML, [])
    raw = yaml.safe_load(SEED_YAML.read_text())
    loaded = OmegaConf.to_container(cfg)
    for key, value in _flatten(raw):
        node = loaded
        for part in key.split("."):
            node = node[part]
        if isinstance(value, float) or isinstance(node, float):
            assert float(node) == pytest.approx(float(value)), key
        else:
            assert node == value, key


def test_unknown_key_names_path_and_closest_key():
    with pytest.raises(ConfigError) as e:
        load_config(SEED_YAML, ["dino.koleo_cls_loss_wieght=1"])
    assert "'dino.koleo_cls_loss_wieght'" in str(e.value)
    assert "did you mean 'dino.koleo_cls_loss_weight'" in str(e.value)


def test_unknown_key_in_file_and_in_dataset_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  archh: vit_small\n")
    with pytest.raises(ConfigError, match=r"student.archh.*in .*bad.yaml.*did you mean 'student.arch'"):
        load_config(bad, [])
    with pytest.raises(ConfigError, match="did you mean 'data.imagenet_1k.txt_path'"):
        load_config(SEED_YAML, ["data.imagenet_1k.txt_pth=x"])
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(SEED_YAML, ["trian.seed=1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'train.batch_size_per_gpu' must be an integer, got 'many'"):
        load_config(SEED_YAML, ["train.batch_size_per_gpu=many"])
    with pytest.raises(ConfigError, match=r"'crops.rgb_mean' must be a list of numbers"):
        load_config(SEED_YAML, ["crops.rgb_mean=3"])
    with pytest.raises(ConfigError, match=r"'student.layerscale' must be a number or null"):
        load_config(SEED_YAML, ["student.layerscale=abc"])


def test_invalid_choice_lists_valid_values():
    with pytest.raises(ConfigError, match="swiglu64"):
        load_config(SEED_YAML, ["student.ffn_layer=swiglu7"])
    with pytest.raises(ConfigError, match="SSLMetaArch, SSLResizeShuffle"):
        load_config(SEED_YAML, ["MODEL.META_ARCHITECTURE=Foo"])


def test_aux_weight_schedules_are_validated():
    with pytest.raises(
        ConfigError, match="did you mean 'resize_shuffle_augmentor.bridge_global_weight.peak'"
    ):
        load_config(SEED_YAML, ["resize_shuffle_augmentor.bridge_global_weight.peek=1"])
    cfg = load_config(SEED_YAML, ["resize_shuffle_augmentor.bridge_global_weight=0.0"])
    assert cfg.resize_shuffle_augmentor.bridge_global_weight == 0.0


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SEED_YAML, ["train.seed"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/config.yaml", [])


def test_data_source_needs_exactly_one_kind():
    with pytest.raises(ConfigError, match="exactly one of txt_path, root, demo"):
        load_config(SEED_YAML, ["data.imagenet_1k.demo=fashion-mnist"])
    with pytest.raises(ConfigError, match="dataset_ratio"):
        load_config(SEED_YAML, ["data.imagenet_1k.dataset_ratio=1.5"])


def test_the_seed_config_has_no_problem():
    assert find_problems(load_config(SEED_YAML, [])) == []


def test_unsupported_features_rejected_when_enabled():
    problems = find_problems(load_config(SEED_YAML, ["optim.epochs=2", "distillation.enabled=true"]))
    assert [p.key for p in problems] == ["distillation.enabled"]
    problems = find_problems(load_config(SEED_YAML, ["optim.epochs=2", "optim.lr=0.1"]))
    assert [p.key for p in problems] == ["optim.lr"] and "schedules.lr.peak" in problems[0].message


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(SEED_YAML, ["student.arch=vit_small", "train.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", [])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_dry_run_on_seed_reports_vit_large():
    out = subprocess.run(
        [sys.executable, "-m", "dino_bridge.train", "--config-file", str(SEED_YAML), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["arch"] == "vit_large"
    assert (report["embed_dim"], report["depth"], report["n_storage_tokens"]) == (1024, 24, 4)
    assert report["ffn_layer"] == "swiglu64"
    assert report["parameters"]["student.backbone"] == 304_762_880
    assert report["parameters"]["student.dino_head"] == report["parameters"]["student.ibot_head"]
    assert report["global_batch_size"] == 64 and report["lr_peak_scaled"] == pytest.approx(5e-5)
    assert report["teacher_targets"] == "dtch"
    assert report["problems"] == []
    # the bridge exists (its weights ramp up from epoch 50): 3×3 convs 1024→512→512, then 14×14 → 1024
    bridge = 1024 * 512 * 9 + 512 + 512 * 512 * 9 + 512 + 512 * 1024 * 196 + 1024 + 2 * 1024
    assert report["parameters"]["student.bridge"] == bridge
    assert "teacher.bridge" not in report["parameters"]


def test_cli_reports_config_errors_cleanly():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dino_bridge.train",
            "--config-file",
            str(SEED_YAML),
            "--dry-run",
            "dino.koleo_cls_loss_wieght=1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert "did you mean 'dino.koleo_cls_loss_weight'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_arch_lists_the_presets():
    with pytest.raises(ConfigError, match="'student.arch' is 'vit_foo'; valid values: vit_tiny, vit_small"):
        load_config(SEED_YAML, ["student.arch=vit_foo"])


def test_missing_data_names_the_dataset_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dino_bridge.train", "--config-file", str(SEED_YAML), "--output-dir",
         str(tmp_path / "run"), "optim.epochs=1", "data.imagenet_1k.txt_path=/nonexistent/list.txt"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert "data.imagenet_1k: image list file '/nonexistent/list.txt' does not exist" in out.stderr
    assert "Traceback" not in out.stderr
