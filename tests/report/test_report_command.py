"""``dino-bridge report`` on a real (tiny) training run's dir, on a run still writing its metrics,
and its exit codes."""

import logging
import re
import shutil
import sys

import pytest
from PIL import Image

from dino_bridge.cli import main
from dino_bridge.report.cli import write_report
from tests.helpers import make_image_folder, run_training, tiny_config

DTCH_STATS = ("history_entropy", "protos_used_soft", "protos_used_sharp", "target_entropy", "boosted")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_run")
    images = make_image_folder(root / "images", n=12, classes=3)
    val = make_image_folder(root / "val", n=6, classes=3, seed=1)
    extra = [
        "dtch.cls_hist_cache=16",  # a short DTCH warm-up
        "dtch.patch_hist_cache=60",
        "evaluation.knn_period=2",  # online kNN at iterations 1 and 3
        f"evaluation.knn_train={images}",
        f"evaluation.knn_val={val}",
        "evaluation.knn_k=5",
    ]
    run_training(tiny_config(images, iterations=4, period=4, extra=extra), root / "run")
    return root / "run"


@pytest.fixture(autouse=True)
def _quiet_console(monkeypatch):
    # the in-process training set up the console log; the command's errors still reach stderr
    monkeypatch.setattr(logging.getLogger("dino_bridge"), "handlers", [logging.NullHandler()])


def test_the_command_on_a_real_run_gives_every_figure_and_the_page(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    page = tmp_path / "out" / "index.html"
    out = capsys.readouterr().out
    assert out.startswith(f"report: {page} (9 figures: losses.png, schedules.png, throughput.png")
    paths = sorted((tmp_path / "out").glob("*.png"))
    names = {p.stem for p in paths}
    assert names == {"losses", "schedules", "throughput", "memory", "skipped", "knn", "grad_norms",
                     "dtch_dino_cls", "dtch_ibot_patch"}  # fmt: skip
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 300
    html = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(sources) == [p.name for p in paths]  # relative: the folder can be moved or served
    for term in ("dino_local_crops_loss", "ibot_loss", "koleo_loss_cls", "koleo_loss_patch"):
        assert f"<td>{term}</td>" in html  # in the final values, found by the naming rule
    for key in ("knn/top1", "knn/top5", "knn/seconds"):  # the online kNN, found by its prefix
        assert f"<td>{key}</td>" in html
    for stat in DTCH_STATS:
        assert f"<td>dtch/dino_cls/{stat}</td>" in html
    assert "ffn_layer: swiglu64" in html  # the resolved config
    assert "finished" in html and "incomplete" not in html


def test_a_run_still_writing_its_metrics(run_dir, tmp_path):
    going = tmp_path / "going"
    going.mkdir()
    shutil.copy(run_dir / "config.yaml", going)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (going / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    page, paths = write_report(going)
    assert page == going / "report" / "index.html" and (going / "report" / "losses.png").is_file()
    html = page.read_text()
    assert "iterations 0–1, 2 records; in progress" in html and "incomplete" in html


def test_user_errors_exit_2_with_one_line(run_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = {
        (str(tmp_path / "missing"),): "does not exist",
        (str(tmp_path / "empty"),): "no metrics.jsonl in",
        (str(run_dir), "--out", str(tmp_path / "a_file")): "is not a directory",
    }
    for argv, message in cases.items():
        assert main(["report", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # not installed
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'dino_bridge[report]'" in capsys.readouterr().err
