"""The README's commands, run as a user would (small budgets)."""

import json
import subprocess
import sys

from tests.helpers import CONFIGS, REPO, read_metrics


def _run(args, timeout=600):
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_smoke_recipe_trains_from_the_command_line(tmp_path):
    _run([sys.executable, "-m", "dino_bridge.train", "--config-file", str(CONFIGS / "smoke_cpu.yaml"),
          "--output-dir", str(tmp_path / "smoke"),
          "optim.epochs=1", "dtch.patch_hist_cache=400"])  # fmt: skip
    records = read_metrics(tmp_path / "smoke")
    assert [r["iteration"] for r in records] == list(range(5))
    assert (tmp_path / "smoke" / "ckpt" / "5" / "teacher_backbone.safetensors").is_file()


def test_quickstart_command_prints_knn_before_and_after(tmp_path):
    out = _run([
        sys.executable, "-m", "dino_bridge.cli", "quickstart", "--output-dir", str(tmp_path / "qs"),
        "--limit-train", "300", "--limit-val", "100",
        "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=3", "train.batch_size_per_gpu=16",
        "train.num_workers=0",
        "dtch.cls_hist_cache=64", "dtch.patch_hist_cache=512",
    ])  # fmt: skip
    assert "kNN before training: 20-NN top-1 = " in out.stdout
    assert "kNN after training:  20-NN top-1 = " in out.stdout
    result = json.loads((tmp_path / "qs" / "quickstart_results.json").read_text())
    assert result["iterations"] == 3 and result["knn_after"]["n_val"] == 100
    assert 0 < result["knn_before"]["top1"]["20"] <= 100 and 0 < result["knn_after"]["top1"]["20"] <= 100


def test_train_help_and_top_level_help():
    assert "--config-file" in _run([sys.executable, "-m", "dino_bridge.train", "--help"]).stdout
    assert "quickstart" in _run([sys.executable, "-m", "dino_bridge.cli", "--help"]).stdout
