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
    for line in ("linear probe before training: top-1 = ", "linear probe after training:  top-1 = ",
                 "linear probe on raw pixels:   top-1 = "):  # fmt: skip
        assert line in out.stdout
    result = json.loads((tmp_path / "qs" / "quickstart_results.json").read_text())
    assert result["iterations"] == 3 and result["knn_after"]["n_val"] == 100
    assert 0 < result["knn_before"]["top1"]["20"] <= 100 and 0 < result["knn_after"]["top1"]["20"] <= 100
    for key in ("linear_before", "linear_after", "linear_raw_pixels"):
        assert 0 < result[key]["top1"] <= 100
        assert (result[key]["n_train"], result[key]["n_test"]) == (300, 100)
    assert result["linear_raw_pixels"]["feature_dim"] == 28 * 28 and result["linear_after"]["max_iter"] == 50


def test_train_help_and_top_level_help():
    assert "--config-file" in _run([sys.executable, "-m", "dino_bridge.train", "--help"]).stdout
    assert "quickstart" in _run([sys.executable, "-m", "dino_bridge.cli", "--help"]).stdout


def test_every_command_reports_a_user_error_in_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    import logging

    from dino_bridge.cli import main

    # earlier in-process trainings leave the console log set up: the error still reaches stderr
    monkeypatch.setattr(logging.getLogger("dino_bridge"), "handlers", [logging.NullHandler()])

    cases = [
        ["eval", "knn", "--checkpoint", str(tmp_path / "nope"), "--train", "x", "--val", "y"],
        ["quickstart", "--output-dir", str(tmp_path / "qs"), "schedules.lr.peak=-1"],
        ["data", "stats", str(tmp_path / "missing")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)


def test_quickstart_stopped_by_a_signal_exits_143_without_evaluating(tmp_path, monkeypatch, capsys):
    import signal

    from dino_bridge import cli, quickstart
    from dino_bridge.train import loop

    figures = {"knn": {"top1": {"20": 50.0}}, "linear": {"top1": 60.0}, "pixels_linear": {"top1": 70.0}}
    monkeypatch.setattr(quickstart, "_evaluate", lambda *a, **k: figures)
    monkeypatch.setattr(loop, "train", lambda *a, **k: {"stopped_at": 7, "stopped_by": signal.SIGTERM})
    assert cli.main(["quickstart", "--output-dir", str(tmp_path / "qs")]) == 143
    out = capsys.readouterr().out
    assert "stopped at iteration 7; rerun the same command to resume" in out
    assert "after training" not in out and not (tmp_path / "qs" / "quickstart_results.json").exists()


def test_our_own_bugs_keep_their_traceback(monkeypatch):
    import pytest

    from dino_bridge import cli
    from dino_bridge.eval import run_knn

    def broken(args):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(run_knn, "main", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        cli.main(["eval", "knn", "--checkpoint", "c", "--train", "t", "--val", "v"])


def test_quickstart_trains_in_fp32_on_a_cpu_that_emulates_bf16(monkeypatch, capsys):
    """On an AVX2-only CPU bf16 matmuls are emulated (75-125x slower): the quickstart switches its recipe
    to fp32 and says so, unless the command line chose a precision; the trainer warns either way."""
    import argparse
    import logging

    import torch

    from dino_bridge import quickstart
    from dino_bridge.config import load_config
    from dino_bridge.distributed import device as device_module
    from dino_bridge.train import build

    assert isinstance(device_module.cpu_has_fast_bf16(), bool)
    config_file = str(quickstart.REPO_CONFIGS / "quickstart.yaml")
    cfg = load_config(config_file, [])
    assert cfg.compute_precision.param_dtype == "bf16"
    cpu = torch.device("cpu")

    def precision(opts, fast):
        monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: fast)
        args = argparse.Namespace(config_file=config_file, opts=opts)
        chosen = quickstart._precision_for(load_config(config_file, opts), cpu, args)
        return chosen.compute_precision.param_dtype

    assert precision([], fast=True) == "bf16"
    assert capsys.readouterr().out == ""
    assert precision([], fast=False) == "fp32"
    assert "no native bf16" in capsys.readouterr().out
    assert precision(["compute_precision.param_dtype=bf16"], fast=False) == "bf16"  # the user's choice

    monkeypatch.setattr(build, "cpu_has_fast_bf16", lambda: False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("dino_bridge").addHandler(handler)
    try:
        build.parallel_plan(cfg, 1, cpu)
    finally:
        logging.getLogger("dino_bridge").removeHandler(handler)
    assert any("without native bf16" in r.getMessage() for r in records)
