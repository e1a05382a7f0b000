"""The report's figures follow the naming rules: a term, DTCH instance, kNN key or metric that no
code names appears, with the right values, in the figures and on the page."""

import math

import numpy as np
import pytest

from dino_bridge.report.page import render_page
from dino_bridge.report.records import RunRecords
from dino_bridge.report.series import build_figure_specs, loss_terms, term_series


def synthetic_records(n=6):
    """Records as the loop writes them, with names invented here: a term ``foo/bar_loss`` that is
    gated off at iteration 2, a DTCH instance ``my_inst`` with a stat added later, sparse online kNN
    and a metric no group knows."""
    records = []
    for it in range(n):
        record = {
            "iteration": it,
            "dino_global_crops_loss": 8.0 - 0.1 * it,
            "dino_global_crops_loss_weight": 0.5,
            "foo/bar_loss_weight": 0.0 if it == 2 else 0.25,
            "total_loss": 5.0,
            "lr": 1e-3 * it,
            "wd": 0.04,
            "teacher_temp": 0.07,
            "mom": 0.99,
            "images_per_sec": 100.0 + it,
            "data_wait_share": 0.1,
            "max_mem_mb": 900.0,
            "skipped_images": 0,
            "skipped_step": False,
            "backbone_grad_norm": 3.0,
            "dtch/my_inst/log_k": math.log(64),
            "dtch/my_inst/history_entropy": 4.0,
            "dtch/my_inst/protos_used_soft": 10.0,
            "dtch/my_inst/protos_used_sharp": 20.0,
            "dtch/my_inst/target_entropy": 4.1,
            "dtch/my_inst/boosted": 1.0,
            "dtch/my_inst/brand_new_stat": float(it),
            "mystery/metric": 2.0 * it,
            "note": "a string is not drawn",
        }
        if it != 2:  # a gated term does not run: no value, weight 0
            record["foo/bar_loss"] = 1.0 + it
        if it % 3 == 0:
            record["knn/top1_20"] = 50.0 + it
        records.append(record)
    return records


def _spec(specs, name):
    return next(s for s in specs if s.name == name)


def _line(panel, label):
    return next(line for line in panel.lines if line.label == label)


def test_an_invented_loss_term_is_found_by_the_naming_rule():
    records = synthetic_records()
    keys = list(records[0])
    assert loss_terms(keys) == ["dino_global_crops_loss", "foo/bar_loss"]
    losses = _spec(build_figure_specs(records), "losses")
    unweighted, weighted, weights = losses.panels
    foo = _line(unweighted, "foo/bar_loss")
    assert foo.x.tolist() == list(range(6))
    assert np.isnan(foo.y[2]) and foo.y[[0, 1, 3, 4, 5]].tolist() == [1, 2, 4, 5, 6]  # a gap where gated
    x, contribution = term_series(records, "foo/bar_loss", weighted=True)
    assert x.tolist() == list(range(6))
    assert contribution.tolist() == [0.25, 0.5, 0.0, 1.0, 1.25, 1.5]  # value x weight; 0 when gated
    assert np.array_equal(_line(weighted, "foo/bar_loss").y, contribution)
    assert "total_loss" in [line.label for line in weighted.lines]
    assert _line(weights, "foo/bar_loss").y.tolist() == [0.25, 0.25, 0.0, 0.25, 0.25, 0.25]
    assert {"foo/bar_loss", "foo/bar_loss_weight"} <= set(losses.keys)


def test_every_group_and_every_unknown_metric_gets_a_figure():
    specs = build_figure_specs(synthetic_records())
    names = [s.name for s in specs]
    assert names == ["losses", "schedules", "throughput", "memory", "skipped", "knn", "grad_norms",
                     "dtch_my_inst", "other_1"]  # fmt: skip
    dtch = _spec(specs, "dtch_my_inst")
    entropy = dtch.panels[0]
    assert _line(entropy, "log K").reference and _line(entropy, "log K").y[0] == pytest.approx(math.log(64))
    assert _line(dtch.panels[1], "K").y[0] == pytest.approx(64)
    assert "brand_new_stat" in dtch.panels[-1].title  # a stat added later: its own panel
    assert _line(_spec(specs, "knn").panels[0], "knn/top1_20").x.tolist() == [0, 3]
    assert _spec(specs, "other_1").keys == ("mystery/metric",)
    drawn = {k for s in specs for k in s.keys}
    numeric = {k for k, v in synthetic_records()[0].items() if not isinstance(v, str)} - {"iteration"}
    assert numeric <= drawn  # everything numeric is drawn somewhere


def test_groups_without_data_are_left_out():
    records = [{"iteration": i, "total_loss": 1.0, "lr": 0.1} for i in range(3)]
    assert [s.name for s in build_figure_specs(records)] == ["schedules", "other_1"]


def test_the_page_lists_the_invented_term_and_the_final_values(tmp_path):
    records = synthetic_records()
    specs = build_figure_specs(records)
    run = RunRecords(tmp_path, records, True, "student:\n  arch: <vit>\n", None,
                     {"quickstart_results.json": {"knn_after": {"top1": {"20": 71.25}}}})  # fmt: skip
    page = render_page(run, specs, [f"{s.name}.png" for s in specs])
    assert '<img src="losses.png"' in page and '<img src="dtch_my_inst.png"' in page
    # the last value, weight and contribution
    assert "<td>foo/bar_loss</td><td>6</td><td>0.25</td><td>1.5</td>" in page
    assert "<td>knn_after</td><td>71.25</td>" in page
    assert "&lt;vit&gt;" in page and "<details>" in page  # the config, escaped, collapsible
    assert "incomplete" in page  # the partial last line is said


def test_every_figure_of_the_synthetic_run_is_drawn(tmp_path):
    from PIL import Image

    from dino_bridge.report.figures import draw_figures

    specs = build_figure_specs(synthetic_records())
    paths = draw_figures(specs, tmp_path)
    assert [p.name for p in paths] == [f"{s.name}.png" for s in specs]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 500
